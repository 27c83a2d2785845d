"""Automatic prefix caching: which KV slots hold the keys and values of which token prefixes.

Pure Python, token ids and slot numbers only. A slot's K/V rows stay valid after its sequence ends until the slot
is given to another sequence, so a new prompt that begins with tokens some slot already holds (a finished request's
slot not yet reused, or a running sequence's) need not compute them: it takes that slot if it is free (nothing to
copy), or has the rows copied into its own (`InferenceSession.copy_prefix`). A position's K/V depend only on the
tokens up to it, and the kernels compute a token with the same bits however its prompt was chunked, so a request
with a hit produces exactly the output it would have without one.

Lookup is by whole blocks of `block_size` tokens, as vLLM's hash-of-blocks: a trie keyed by each block's token
tuple (exact: no hash can collide), whose nodes record the slots holding that block after that prefix. A slot
holding block b holds every block before it, so the nodes a slot is in form one path from the root; removing a
slot's tail prunes nodes no slot holds. The match then goes on token by token into the candidate slots' own
tokens (as llama.cpp's cache_prompt does): a few-shot prefix of 423 tokens is 26 whole blocks and 7 tokens more,
and those 7 are a third of what each request would otherwise compute. Eviction is per slot, least recently freed
first (see Scheduler).
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
        # Each slot's tokens with K/V in it: the first `_valid` of its sequence's prompt, then output, ids.
        self._ids: list[tuple[Sequence[int], Sequence[int]]] = [((), ())] * num_slots
        self._valid = [0] * num_slots

    def held(self, slot: int) -> int:
        """Tokens whose K/V the slot holds (as far as the cache knows)."""
        return self._valid[slot]

    def lookup(self, ids: Sequence[int], limit: int) -> dict[int, int]:
        """{slot: n} for the slots holding the longest runs of ids[:limit]: the longest run of whole blocks some
        slots hold, continued token by token into each of them; {} if not even one whole block is held."""
        node, b, n = self._root, self.block_size, 0
        while n + b <= limit:
            child = node.children.get(tuple(ids[n : n + b]))
            if child is None:
                break
            node, n = child, n + b
        if not n:
            return {}
        out = {}
        for slot in node.slots:
            prompt, output = self._ids[slot]
            end = min(limit, self._valid[slot])
            k = n
            while k < end and (prompt[k] if k < len(prompt) else output[k - len(prompt)]) == ids[k]:
                k += 1
            out[slot] = k
        return out

    def truncate(self, slot: int, n_tokens: int) -> None:
        """Forget what the slot holds from token n_tokens on: it is about to be overwritten, or was never
        written."""
        path = self._path[slot]
        keep = n_tokens // self.block_size
        while len(path) > keep:
            node = path.pop()
            node.slots.discard(slot)
            if not node.slots and not node.children:
                del node.parent.children[node.key]
        self._valid[slot] = min(self._valid[slot], n_tokens)

    def assign(self, slot: int, prompt: Sequence[int], output: Sequence[int], n_valid: int, own: bool) -> None:
        """The slot now belongs to a sequence (prompt, then output: the lists themselves, read as they grow)
        whose first n_valid tokens' K/V it holds: the slot's own (`own`: a hit in this slot) or copied into it.
        Anything else it held is forgotten."""
        self.truncate(slot, n_valid if own else 0)
        self._ids[slot] = (prompt, output)
        self.extend(slot, n_valid)

    def extend(self, slot: int, n_valid: int) -> None:
        """The slot now holds its sequence's first n_valid tokens: register its new whole blocks."""
        self._valid[slot] = n_valid
        path, b = self._path[slot], self.block_size
        prompt, output = self._ids[slot]
        if n_valid // b <= len(path):
            return
        ids = prompt if n_valid <= len(prompt) else list(prompt) + list(output)
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
