"""Automatic prefix caching: which KV slots hold the keys and values of which token prefixes.

Pure Python, token ids and slot numbers only. A slot's K/V rows stay valid after its sequence ends until the slot
is given to another sequence, so a new prompt that begins with tokens some slot already holds (a finished request's
slot not yet reused, or a running sequence's) need not compute them: it takes that slot if it is free (nothing to
copy), or has the rows copied into its own (`InferenceSession.copy_prefix`). A position's K/V depend only on the
tokens up to it, and the kernels compute a token with the same bits however its prompt was chunked, so a request
with a hit produces exactly the output it would have without one.

Matching is by whole blocks of `block_size` tokens, as vLLM's hash-of-blocks: a trie keyed by each block's token
tuple (exact: no hash can collide), whose nodes record the slots holding that block after that prefix. A slot
holding block b holds every block before it, so the nodes a slot is in form one path from the root; removing a
slot's tail prunes nodes no slot holds. Eviction is per slot, least recently freed first (see Scheduler).
"""

from __future__ import annotations

from collections.abc import Sequence


class _Node:
    __slots__ = ("children", "slots", "parent", "key")

    def __init__(self, parent: "_Node | None", key: tuple[int, ...]) -> None:
        self.children: dict[tuple[int, ...], _Node] = {}
        self.slots: set[int] = set()
        self.parent = parent
        self.key = key


class PrefixCache:
    def __init__(self, num_slots: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._root = _Node(None, ())
        self._path: list[list[_Node]] = [[] for _ in range(num_slots)]  # the blocks each slot holds, in order

    def held(self, slot: int) -> int:
        """Tokens of the slot's registered prefix (whole blocks)."""
        return len(self._path[slot]) * self.block_size

    def lookup(self, ids: Sequence[int], limit: int) -> tuple[int, frozenset[int]]:
        """The longest run of whole blocks at the start of ids[:limit] that some slot holds: (its token count,
        the slots holding it); (0, {}) if none."""
        node, b, n = self._root, self.block_size, 0
        while n + b <= limit:
            child = node.children.get(tuple(ids[n : n + b]))
            if child is None:
                break
            node, n = child, n + b
        return n, frozenset(node.slots) if n else frozenset()

    def truncate(self, slot: int, n_tokens: int) -> None:
        """Forget the slot's blocks from token n_tokens on (rounded down to a block): they are about to be
        overwritten, or were never written."""
        path = self._path[slot]
        keep = n_tokens // self.block_size
        while len(path) > keep:
            node = path.pop()
            node.slots.discard(slot)
            if not node.slots and not node.children:
                del node.parent.children[node.key]

    def extend(self, slot: int, ids: Sequence[int], n_valid: int) -> None:
        """Register the slot's whole blocks among its first n_valid tokens (ids: at least that many), whose K/V
        are now in the slot."""
        path, b = self._path[slot], self.block_size
        node = path[-1] if path else self._root
        for start in range(len(path) * b, n_valid - b + 1, b):
            key = tuple(ids[start : start + b])
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(node, key)
            child.slots.add(slot)
            path.append(child)
            node = child

    def num_nodes(self) -> int:
        """Blocks in the trie (tests check that forgotten blocks are pruned)."""
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count
