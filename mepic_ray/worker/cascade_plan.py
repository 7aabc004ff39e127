"""The step's cascade-attention metadata, built once and read by every layer: which
runs of chunk pages several rows read (``mepic_ray.kernels.cascade.SharedRuns``), and each
sequence's other keys: for single-row sequences its text keys and its per-offset
groups of chunk keys (``KeyGroups``), for the rest ``OwnKeys``."""
from __future__ import annotations

import torch

from mepic_ray.kernels import RopeTable
from mepic_ray.kernels.cascade import KeyGroups, KeyTile, OwnKeys, SharedRuns

TILE_ROWS = 64     # rows of a prefill piece that share one masked product


def slot_offsets(positions: list[int], local_spans: list[tuple[int, int, int]], n: int) -> torch.Tensor:
    """Per logical slot below ``n``: how far its position here lies past the position
    its key is stored at (the chunk's start in ``local_spans``, else 0), -1 for padding."""
    pos = torch.tensor(positions[:n], dtype=torch.long)
    if not local_spans:
        return torch.zeros(n, dtype=torch.long).masked_fill_(pos < 0, -1)
    a, b, o = zip(*local_spans)
    return _fill_spans(n, a, b, o).masked_fill_(pos < 0, -1)


def _fill_spans(n: int, starts, ends, values) -> torch.Tensor:
    """[n] holding each value over its disjoint span [start, end) and 0 elsewhere: one
    cumulative sum over the edges, not one write per span."""
    a, b, v = (torch.tensor(x, dtype=torch.long) for x in (starts, ends, values))
    edges = torch.zeros(n + 1, dtype=torch.long)
    edges.index_add_(0, a.clamp(max=n), v).index_add_(0, b.clamp(max=n), -v)
    return torch.cumsum(edges, 0)[:-1]


def build_cascade(specs, offsets: list[torch.Tensor], rows_pos: torch.Tensor, rows_logical: list[torch.Tensor],
                  bs: int, rope: RopeTable, device) -> tuple[list[OwnKeys], KeyGroups | None, KeyGroups | None,
                                                             list[SharedRuns]]:
    # Runs each sequence may read the shared way: wholly before its first query row.
    visible = []
    for s in specs:
        seen: dict = {}
        mine = []
        for blocks, logical, local in s.shared_runs:
            if logical + len(blocks) * bs <= s.query_slots[0]:
                seen[(blocks, local)] = seen.get((blocks, local), -1) + 1   # the same chunk twice: a group each
                mine.append(((blocks, local, seen[(blocks, local)]), logical))
        visible.append(mine)
    readers: dict = {}
    for mine in visible:
        for key, _ in mine:
            readers[key] = readers.get(key, 0) + 1
    own, runs, start = [], {}, 0
    dec_rows, dec_slots, grp_rows, grp_slots, grp_offs = [], [], [], [], []
    pos_list = rows_pos.tolist()
    for s, off, ql, mine in zip(specs, offsets, rows_logical, visible):
        n = ql.numel()
        cut_from, cut_to = [], []
        off_list = off.tolist() if mine else []
        for key, logical in mine:
            if readers[key] < 2:     # read by this sequence alone: with its other keys
                continue
            blocks, local, _ = key
            g = runs.setdefault(key, {"blocks": blocks, "local": local, "rows": [], "pos": []})
            g["rows"].extend(range(start, start + n))
            # The run's offset as the spans give it; its last slot is real (chunks are front-padded).
            offset = off_list[logical + len(blocks) * bs - 1]
            g["pos"].extend(p - offset for p in pos_list[start:start + n])
            cut_from.append(logical)
            cut_to.append(logical + len(blocks) * bs)
        if cut_from:                 # the shared runs' slots leave this sequence's own keys
            off = off.masked_fill(_fill_spans(off.numel(), cut_from, cut_to, [1] * len(cut_from)) > 0, -1)
        logical_real = torch.nonzero(off >= 0).flatten()
        bt = torch.tensor(s.block_table, dtype=torch.long)
        slots = bt[logical_real // bs] * bs + logical_real % bs
        o = off[logical_real]
        if n == 1 and int(off[ql[0]]) == 0:      # a decode (or a one-row piece of text)
            text = o == 0
            dec_rows.append(start)
            dec_slots.append(slots[text])
            grp_rows.append(torch.full((int((~text).sum()),), start, dtype=torch.long))
            grp_slots.append(slots[~text])
            grp_offs.append(o[~text])
        else:
            own.append(_own_keys(start, ql.cpu(), logical_real, slots, o, rope, device))
        start += n
    decodes = None
    if dec_rows:
        decodes = KeyGroups(torch.tensor(dec_rows, device=device), *_pad_lists(dec_slots, device), None, None)
    return own, decodes, _key_groups(grp_rows, grp_slots, grp_offs, rows_pos, rope, device), \
        _shared_runs(list(runs.values()), bs, rope, device)


def _own_keys(start: int, ql: torch.Tensor, logical: torch.Tensor, slots: torch.Tensor, offs: torch.Tensor,
              rope: RopeTable, device) -> OwnKeys:
    """A multi-row sequence's keys (``logical`` slots, ascending, stored at ``slots``, at
    offsets ``offs``) for its query slots ``ql``, each among the keys; row i reads the
    keys up to its own slot. When the rows are the only keys from the first of them on,
    all computed at offset 0 (a prefill, or a piece of one), they read each other
    causally (the kernel skips the blocks above the diagonal) and the keys before them
    unmasked. Otherwise each tile of ``TILE_ROWS`` rows reads the keys before its first
    row unmasked, and masks only the keys between its first and last row: a prefill
    whose rows lie between chunks (MEPIC's recomputed blocks) computes about 1/tiles
    more than it reads, not the whole staircase twice."""
    n, total = ql.numel(), logical.numel()
    if not bool((ql[1:] > ql[:-1]).all()):
        raise ValueError(f"a piece's query slots must be ascending, got {ql.tolist()}")
    present = logical >= ql[0]
    turn = torch.nonzero(offs != 0).flatten()
    keys = OwnKeys(slots.to(device), turn.to(device), *rope.lookup(offs[turn].to(rope.cos.device)), [])
    if int(present.sum()) == n and not bool(offs[present].any()):
        keys.tiles.append(KeyTile(start, start + n, total - n, total, None, causal=True))
        if total > n:
            keys.tiles.append(KeyTile(start, start + n, 0, total - n, None, merge=True))
        return keys
    first_key = torch.searchsorted(logical, ql).tolist()           # row i's own key
    for a in range(0, n, TILE_ROWS):
        b = min(a + TILE_ROWS, n)
        k0, k1 = first_key[a], first_key[b - 1] + 1
        mask = logical[None, k0:k1] <= ql[a:b, None]
        keys.tiles.append(KeyTile(start + a, start + b, k0, k1, mask.to(device)))
        if k0:
            keys.tiles.append(KeyTile(start + a, start + b, 0, k0, None, merge=True))
    return keys


def _key_groups(rows, slots, offs, rows_pos, rope: RopeTable, device) -> KeyGroups | None:
    """Each (row, offset) pair's keys, one group each."""
    if not rows or not sum(x.numel() for x in rows):
        return None
    rows, slots, offs = torch.cat(rows), torch.cat(slots), torch.cat(offs)
    width = int(offs.max()) + 1
    uniq, ids = torch.unique(rows * width + offs, return_inverse=True)
    g_rows, g_offs = uniq // width, uniq % width
    kv_slots, valid = _padded(ids, slots, uniq.numel(), device)
    q_cos, q_sin = rope.lookup((rows_pos.cpu()[g_rows] - g_offs).to(rope.cos.device))
    return KeyGroups(g_rows.to(device), kv_slots, valid, q_cos, q_sin)


def _pad_lists(lists: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.cat([torch.full((x.numel(),), i, dtype=torch.long) for i, x in enumerate(lists)])
    return _padded(ids, torch.cat(lists), len(lists), device)


def _padded(ids: torch.Tensor, slots: torch.Tensor, num: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slots of ``num`` groups (``ids``: each slot's group) as [num, longest]; the
    padding repeats the group's first slot, which holds a real (finite) key."""
    order = torch.argsort(ids, stable=True)
    ids, slots = ids[order], slots[order]
    counts = torch.bincount(ids, minlength=num)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ids.numel()) - starts[ids]
    width = int(counts.max())
    out = slots[starts][:, None].repeat(1, width)
    out[ids, rank] = slots
    if bool((counts == width).all()):
        return out.to(device), None
    return out.to(device), (torch.arange(width)[None, :] < counts[:, None]).to(device)


def _shared_runs(runs: list[dict], bs: int, rope: RopeTable, device) -> list[SharedRuns]:
    """The runs in padded products, runs of similar shape together (how many rows read
    a run ranges from two decodes to every row of several prefill pieces)."""
    out, slots = [], []
    for g in runs:
        local = torch.arange(g["local"], g["local"] + len(g["blocks"]) * bs)
        real = torch.nonzero(local >= 0).flatten()
        slots.append(torch.tensor(g["blocks"], dtype=torch.long)[real // bs] * bs + real % bs)
    rows = [torch.tensor(g["rows"]) for g in runs]
    pos = [torch.tensor(g["pos"]) for g in runs]
    for bucket in _buckets([r.numel() for r in rows], [k.numel() for k in slots]):
        kv_slots, valid = _pad_lists([slots[i] for i in bucket], device)
        rows_b, real_rows = _pad_lists([rows[i] for i in bucket], device)
        pos_b, _ = _pad_lists([pos[i] for i in bucket], rope.cos.device)
        out.append(SharedRuns(kv_slots, valid, rows_b, real_rows, *rope.lookup(pos_b)))
    return out


def _buckets(num_rows: list[int], num_keys: list[int], slack: float = 1.25) -> list[list[int]]:
    """Indices of runs grouped so that each group's padded product ([runs, most rows,
    most keys]) is at most ``slack`` times its runs' own products: greedily, by rows."""
    order = sorted(range(len(num_rows)), key=lambda i: (-num_rows[i], -num_keys[i]))
    groups: list[list[int]] = []
    work = most_rows = most_keys = 0
    for i in order:
        rows, keys = max(most_rows, num_rows[i]), max(most_keys, num_keys[i])
        size = num_rows[i] * num_keys[i]
        if groups and (len(groups[-1]) + 1) * rows * keys <= slack * (work + size):
            groups[-1].append(i)
            work, most_keys = work + size, keys
        else:
            groups.append([i])
            work, most_rows, most_keys = size, num_rows[i], num_keys[i]
    return groups
