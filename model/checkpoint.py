"""The model directory format and strict weight loading.

A model directory holds:
    config.json         Hugging Face GPT-2 config keys (model.config.GPT2Config)
    model.safetensors   weights, Hugging Face state_dict names and layouts (the default), or
    model.ckpt          the same tensors as a MindSpore checkpoint
    tokenizer files     encoder.json + vocab.bpe (and/or vocab.json + merges.txt), when known

Because names and layouts are Hugging Face's, `model.safetensors` written here is also a valid Hugging Face
GPT-2 weights file. Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming it.
Writing is atomic (`model.atomic_write`): everything goes into a temporary sibling directory that is renamed
into place at the end. An existing destination is replaced only when it is empty or already a model directory
(or with overwrite=True): a directory of someone's other files is refused, never emptied.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import mindspore as ms
import numpy as np

from . import packed_cache
from .atomic_write import write_atomically
from .config import GPT2Config
from .gpt2 import GPT2LMHeadModel, is_transposed_weight, weights_loaded_later
from .quantize import SCALE_SUFFIX, dequantize_state, is_quantized, is_quantized_name

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
CKPT_NAME = "model.ckpt"
WEIGHTS_FORMATS = {"safetensors": SAFETENSORS_NAME, "ckpt": CKPT_NAME}
# A directory holding config.json and one of these is a model directory (ours, or a Hugging Face export).
MODEL_WEIGHT_FILES = (SAFETENSORS_NAME, CKPT_NAME, "pytorch_model.bin")
TOKENIZER_FILES = ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")

class CheckpointError(ValueError):
    """A weights file that cannot be loaded into the model (corrupt, missing/extra/mis-shaped tensors)."""


def parameter_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter name of GPT2LMHeadModel(cfg) with its shape, in state_dict order (no MindSpore needed)."""
    d, inner = cfg.n_embd, cfg.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (cfg.vocab_size, d),
        "transformer.wpe.weight": (cfg.n_positions, d),
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, inner), p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["transformer.ln_f.bias"] = (d,)
    return shapes


def check_state_dict(state: Mapping[str, np.ndarray], cfg: GPT2Config, *, source: str = "weights") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, cfg, source=source)


def check_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: GPT2Config, *, source: str = "weights") -> None:
    """check_state_dict from the tensors' names and shapes alone."""
    expected = parameter_shapes(cfg)
    missing = [k for k in expected if k not in shapes]
    extra = sorted(k for k in shapes if k not in expected)
    bad = [f"{k}: expected {expected[k]}, got {tuple(shapes[k])}"
           for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    if bad:
        problems.append(f"wrong shapes: {'; '.join(bad)}")
    if problems:
        raise CheckpointError(f"{source} do not match the GPT-2 config ({cfg.n_layer} layers, n_embd "
                              f"{cfg.n_embd}, vocab {cfg.vocab_size}): " + " | ".join(problems))


def state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays under their Hugging Face names and in Hugging Face layouts."""
    return {p.name: _to_hf(p.name, p.asnumpy()) for p in model.get_parameters()}


def load_state_dict(model, state: Mapping[str, np.ndarray], *, source: str = "weights") -> None:
    """Copy arrays into the model's parameters after checking names and shapes (float32 parameters). `state` may
    be a LazyWeights: each tensor is then read from the file when its parameter is set and dropped after, so
    loading holds the model's parameters plus one tensor, never a second copy of the weights."""
    shapes = state.shapes if isinstance(state, LazyWeights) else {k: tuple(v.shape) for k, v in state.items()}
    check_shapes(shapes, model.config, source=source)
    for p in model.get_parameters():
        a = np.asarray(state[p.name], dtype=np.float32)
        p.set_data(ms.Tensor(np.ascontiguousarray(a.T if is_transposed_weight(p.name) else a)))
        del a


def _to_hf(name: str, a: np.ndarray) -> np.ndarray:
    # The model stores the Conv1D weights [out, in]; Hugging Face layout is [in, out] (see model.gpt2).
    return np.ascontiguousarray(a.T) if is_transposed_weight(name) else a


# ---- weight files ------------------------------------------------------------------------------------------

def read_weights(path: str) -> dict[str, np.ndarray]:
    """Read model.safetensors or model.ckpt into numpy arrays; a corrupt file is a CheckpointError."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return load_file(path)
        if path.endswith(".ckpt"):
            return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors and MindSpore raise several types for a damaged file
        raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    raise CheckpointError(f"unknown weights file type {path}; expected .safetensors or .ckpt")


class LazyWeights(Mapping):
    """A safetensors file's tensors read one at a time, as they are asked for (`state[name]`); `shapes` without
    reading any. A quantized directory's file (model.quantize) reads as the float32 tensors it stands for, its int8
    weights and scales kept in `int8` as they are read.

    Read with plain file reads, not the safetensors package's memory map: the pages of a mapped file count in the
    process's resident set until it is unmapped, so loading GPT-2 124M peaked at its 500 MB of parameters plus the
    500 MB file (1.39 GB with MindSpore's 400 MB, against 0.92 GB once loaded). The format is a little-endian u64
    header length, a JSON header {name: {dtype, shape, data_offsets}} and the tensors' bytes."""

    _DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
               "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

    def __init__(self, path: str, *, quantized: bool = False) -> None:
        import json

        self.path = path
        self.quantized = quantized
        self.int8: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._local = threading.local()
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} does not fit the file's {size} bytes")
                header = json.loads(f.read(n))
            self._base = 8 + n
            self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
            for k, v in self._entries.items():
                start, end = v["data_offsets"]
                dtype = np.dtype(self._DTYPES[v["dtype"]])
                if not 0 <= start <= end <= size - self._base or end - start != dtype.itemsize * int(
                        np.prod(v["shape"], dtype=np.int64)):
                    raise ValueError(f"tensor {k}: offsets {start}..{end} do not match its shape and the file")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
        self._raw_shapes = {k: tuple(v["shape"]) for k, v in self._entries.items()}
        self.shapes = {k: v for k, v in self._raw_shapes.items()
                       if not (quantized and k.endswith(SCALE_SUFFIX) and is_quantized_name(k[: -len(SCALE_SUFFIX)]))}

    def _read(self, name: str, rows: int | None = None) -> np.ndarray:
        # The tensor, or only its first `rows` rows (only their bytes read).
        e = self._entries[name]
        dtype = self._DTYPES[e["dtype"]]
        shape = list(e["shape"])
        if rows is not None and shape:
            shape[0] = min(rows, shape[0])
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self._base + e["data_offsets"][0])
            a = np.fromfile(f, dtype=dtype, count=count)
        if len(a) != count:
            raise CheckpointError(f"cannot read {name} from {self.path}: the file is shorter than its header says")
        if e["dtype"] == "BF16":  # bfloat16: the high half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.reshape(shape)

    def read_transient(self, name: str) -> np.ndarray:
        """self[name] as float32, read into a buffer that this thread's next call reuses (valid until then): no fresh
        memory per tensor (loading GPT-2 1.5B this way touches 6 GB of new pages less)."""
        e = self._entries.get(name)
        if e is None or e["dtype"] != "F32" or (self.quantized and is_quantized_name(name)):
            return np.asarray(self[name], np.float32)
        start, end = e["data_offsets"]
        scratch = getattr(self._local, "scratch", None)  # one buffer per thread
        if scratch is None or scratch.nbytes < end - start:
            scratch = self._local.scratch = np.empty(end - start, np.uint8)
        a = scratch[: end - start]
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(a) != end - start:
                raise CheckpointError(f"cannot read {name} from {self.path}: the file is shorter than its header says")
        return a.view(np.float32).reshape(e["shape"])

    def read_rows(self, name: str, n: int) -> np.ndarray:
        """The first n rows of a tensor as float32 (only their bytes read, but for a quantized one)."""
        if self.quantized and is_quantized_name(name):
            return np.asarray(self[name][:n], np.float32)
        return np.asarray(self._read(name, rows=n), np.float32)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        a = self._read(name)
        if not (self.quantized and is_quantized_name(name)):
            return a
        scale = self._read(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in self._raw_shapes else None
        try:
            floats, int8 = dequantize_state({name: a} if scale is None else {name: a, name + SCALE_SUFFIX: scale})
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        self.int8.update(int8)
        return floats[name]

    def int8_rows(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A quantized tensor as (q [out, in] int8, scale (out,)): the file's own, or quantized now from its
        float values (model.kernels.quantize_int8, as InferenceSession quantizes a float model)."""
        if self.quantized:
            self[name]  # checks the pair and records it
            return self.int8.pop(name)
        return _quantize_rows(name, np.asarray(self._read(name), np.float32))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def write_weights(state: Mapping[str, np.ndarray], path: str) -> None:
    """Write model.safetensors (marked as PyTorch layout, which it is) or model.ckpt."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata={"format": "pt"})
    elif path.endswith(".ckpt"):
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], path)
    else:
        raise ValueError(f"unknown weights file type {path}; expected .safetensors or .ckpt")


def find_weights(path: str) -> str:
    """The weights file of a model directory (model.safetensors preferred over model.ckpt)."""
    for name in (SAFETENSORS_NAME, CKPT_NAME):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {CKPT_NAME} in model directory {path}")


# ---- model directories -------------------------------------------------------------------------------------

def load_model_dir(path: str | os.PathLike, *, compute_dtype="float32", cls=GPT2LMHeadModel,
                   pack: str | None = None, defer_packing: bool = False) -> GPT2LMHeadModel:
    """Build `cls` (GPT2LMHeadModel or a subclass, such as textgen's) from a model directory; strict (see
    load_state_dict).

    pack: for a model used only through one InferenceSession (the server), load the weights that session packs
    straight into its packed form, as each is read, and leave their float parameters empty, so that the float32
    weights and their packed copy are never both in memory (GPT-2 1.5B: 13.3 GB at the peak otherwise, for 6.2
    GB of weights). "panels" or "amx" (model.kernels.packed_form): the projections go to
    `model.packed_weights[name]`, each packed from the file's [in, out] layout; "int8": the quantized tensors
    (model.quantize: the projections and the token embedding) to `model.int8_weights[name]` as (q, scale), the
    file's own or quantized as read. The session must then use that same form (InferenceSession checks).

    defer_packing: with pack="panels", return once the packed Parameters exist, their memory not yet written,
    and pack into it on a background thread: `model.packing` is its Future (see load_packed)."""
    if pack not in (None, "panels", "amx", "int8"):
        raise ValueError(f"pack must be None, 'panels', 'amx' or 'int8', got {pack!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = GPT2Config.from_json(os.path.join(path, CONFIG_NAME))
    weights = find_weights(path)
    with weights_loaded_later():
        model = cls(cfg, compute_dtype=compute_dtype)
    if pack is not None and weights.endswith(".safetensors"):
        load_packed(model, LazyWeights(weights, quantized=is_quantized(cfg)), pack, source=weights,
                    defer=defer_packing)
        return model
    if weights.endswith(".safetensors"):  # read tensor by tensor: no second copy of the weights in memory
        lazy = LazyWeights(weights, quantized=is_quantized(cfg))
        load_state_dict(model, lazy, source=weights)
        int8 = lazy.int8 if lazy.quantized else None
    else:
        state, int8 = _float_state(read_weights(weights), cfg, weights)
        if pack is not None:  # a .ckpt file: read whole, then packed tensor by tensor all the same
            load_packed(model, state, pack, source=weights, int8=int8)
            return model
        load_state_dict(model, state, source=weights)
    # A quantized directory (model.quantize): the model holds the dequantized weights, and an int8 session
    # (InferenceSession(quantize="int8")) runs the stored int8 weights and scales as they are.
    model.int8_weights = int8
    return model


def _quantize_rows(name: str, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A file's tensor (Hugging Face layout) quantized per output row of the model's layout, [out, in].
    from . import kernels

    return kernels.quantize_int8(a.T if is_transposed_weight(name) else a)


def _empty(p) -> None:
    p.set_data(ms.Tensor(np.zeros((0,), np.float32)), slice_shape=True)


def load_packed(model, state: Mapping[str, np.ndarray], pack: str, *, source: str = "state dict",
                int8: dict | None = None, defer: bool = False) -> None:
    """Load `state` (Hugging Face layout and names: a LazyWeights or a dict of arrays) into `model` as
    load_model_dir(pack=) does: the weights a session packs in `pack` go straight to `model.packed_weights`
    (panels, amx) or `model.int8_weights` (int8), their float parameters left empty; the rest as usual. int8: a
    dict state's stored int8 weights (name -> (q, scale), a quantized .ckpt's), used as they are.

    defer (panels): the packed Parameters are made over memory not yet written, and the projections are packed
    into it on a background thread, `model.packing` (a Future; wait_packed waits for it and raises its error).
    The server compiles its step graphs meanwhile (compiling reads no weights; the warm-up steps it runs compute
    from whatever the memory holds, and their outputs are dropped): a cold start of GPT-2 1.5B spends ~20 s
    compiling and 15-60 s loading on a 2-core VM, one after the other otherwise. The rest of the weights (the
    token embedding, which the session packs for the LM head, included) are loaded before this returns."""
    from . import kernels

    if pack not in ("panels", "amx", "int8"):
        raise ValueError(f"pack must be 'panels', 'amx' or 'int8', got {pack!r}")
    shapes = {k: np.shape(state[k]) for k in state} if isinstance(state, dict) else state.shapes
    check_shapes(shapes, model.config, source=source)
    model.packed_form, model.packed_weights = pack, {}
    if pack == "int8":
        model.int8_weights = {}

    def read(name: str) -> np.ndarray:
        if isinstance(state, LazyWeights):
            return state.read_transient(name)
        return np.asarray(state[name], np.float32)

    def int8_rows(name: str) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(state, LazyWeights):
            return state.int8_rows(name)
        if int8 and name in int8:
            return int8[name]
        return _quantize_rows(name, read(name))

    def packed(name: str):  # a projection: [in, out] in the file
        return kernels.packed_parameter(read(name), pack, f"{name}.{pack}", kn=True)

    params = list(model.get_parameters())
    projections = [p for p in params if pack != "int8" and is_transposed_weight(p.name)]
    # A safetensors file's packed projections from an earlier start (model.packed_cache), mapped in place.
    key = cached = None
    if projections and isinstance(state, LazyWeights) and packed_cache.cache_dir() is not None:
        key = packed_cache.cache_key(state.path, pack, kernels.panel_width(), kernels.library_path())
        cached = packed_cache.load(key, {f"{p.name}.{pack}": kernels.packed_shape(*state.shapes[p.name], pack)
                                         for p in projections})
        if cached is not None and not _matches_file(cached, state, [p.name for p in projections], pack):
            log.warning("packed cache for %s does not match the weights file: packing the weights", state.path)
            packed_cache.release(key, cached)
            cached = None
    model.packing = None
    if cached is not None:
        for p in projections:
            model.packed_weights[p.name] = kernels.parameter_over(cached[f"{p.name}.{pack}"], f"{p.name}.{pack}")
            _empty(p)
    elif defer and pack == "panels" and projections:
        # np.empty: pages not touched until the packing writes them (parameter_over shares the array's memory)
        arrays = {p.name: np.empty(kernels.packed_shape(*shapes[p.name], pack), np.float32) for p in projections}
        for p in projections:
            model.packed_weights[p.name] = kernels.parameter_over(arrays[p.name], f"{p.name}.{pack}")
            _empty(p)

        # Two daemon threads, as below, not a ThreadPoolExecutor: Python's exit waits for an executor's queued work,
        # and a server that fails or is stopped while loading must not wait for the rest of the packing.
        done = model.packing = Future()
        todo, lock, errors = iter(list(arrays)), threading.Lock(), []

        def pack_some() -> None:
            while not errors:
                with lock:
                    name = next(todo, None)
                if name is None:
                    return
                try:
                    kernels.pack_panels_kn(read(name), out=arrays[name])
                except BaseException as e:
                    errors.append(e)

        def pack_all() -> None:
            started = []
            try:  # the Future is always set, or wait_packed would wait for ever
                for i in range(min(2, os.cpu_count() or 1)):
                    t = threading.Thread(target=pack_some, name=f"packing-{i}", daemon=True)
                    t.start()
                    started.append(t)
            except BaseException as e:
                errors.append(e)
            for t in started:
                t.join()
            if errors:
                done.set_exception(errors[0])
            else:
                done.set_result(None)

        threading.Thread(target=pack_all, name="packing", daemon=True).start()
        if key is not None:
            model.packed_cache_pending = packed_cache.Pending(
                key, {f"{name}.{pack}": a for name, a in arrays.items()}, list(model.packed_weights.values()))
    else:
        # Two threads: most of the time goes to the first touch of the packed weights' new pages, which the kernel
        # serves for two threads at once (measured on a 2-core VM: 0.85 against 0.50 GB/s); numpy's copies and
        # the reads release the GIL.
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            for p, param in zip(projections, pool.map(packed, [p.name for p in projections])):
                model.packed_weights[p.name] = param
                _empty(p)
        if key is not None:  # for the next start, when asked (packed_cache.write_pending: the server, once warm)
            model.packed_cache_pending = packed_cache.Pending(
                key, {f"{name}.{pack}": w.asnumpy() for name, w in model.packed_weights.items()},
                list(model.packed_weights.values()))
    for p in params:
        if pack == "int8" and is_quantized_name(p.name):
            model.int8_weights[p.name] = int8_rows(p.name)
            _empty(p)
        elif p.name not in model.packed_weights:
            p.set_data(ms.Tensor(np.ascontiguousarray(np.asarray(state[p.name], np.float32))))


def wait_packed(model) -> None:
    """Wait until a deferred load's projections are packed (load_model_dir(defer_packing=True)); raises what the
    packing raised. Returns at once for any other model."""
    packing = getattr(model, "packing", None)
    if packing is not None:
        packing.result()
        model.packing = None


def _matches_file(cached: dict, state: LazyWeights, names: list[str], pack: str) -> bool:
    # Each cached projection's first 32 k's against those rows of the weights file packed now: a cache file that
    # the key failed to tell apart from another model's would differ there.
    from . import kernels

    for name in names:
        rows = state.read_rows(name, 32)
        got = cached[f"{name}.{pack}"]
        want = kernels.pack_weight(rows, pack, kn=True)
        part = got[:, : rows.shape[0]] if pack == "panels" else got[:, :, : rows.shape[0] // 2]
        if not np.array_equal(part, want):
            return False
    return True


def _float_state(state: Mapping[str, np.ndarray], cfg: GPT2Config, source: str) -> tuple[Mapping, dict | None]:
    # A quantized directory's state as the float32 state dict it stands for, and its int8 weights.
    if not is_quantized(cfg):
        return state, None
    try:
        return dequantize_state(state)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def save_model_dir(model, path: str | os.PathLike, *, weights_format: str = "safetensors",
                   tokenizer_dir: str | None = None) -> None:
    """Write `model` as a model directory, atomically; see write_model_dir."""
    write_model_dir(path, model.config, state_dict(model), weights_format=weights_format,
                    tokenizer_dir=tokenizer_dir)


def write_model_dir(path: str | os.PathLike, cfg: GPT2Config, state: Mapping[str, np.ndarray], *,
                    weights_format: str = "safetensors", tokenizer_dir: str | None = None,
                    overwrite: bool = False) -> None:
    """Write config, weights and tokenizer files into a temporary directory, then rename it to `path`.

    An existing directory at `path` is replaced only after the new one is complete, and only when it is empty,
    a model directory, or `overwrite` is true (see check_destination).
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"unknown weights format {weights_format!r}; use one of {', '.join(WEIGHTS_FORMATS)}")
    check_state_dict(_float_state(state, cfg, "weights to save")[0], cfg, source="weights to save")

    def write(tmp: str) -> None:
        cfg.to_json(os.path.join(tmp, CONFIG_NAME))
        write_weights(state, os.path.join(tmp, WEIGHTS_FORMATS[weights_format]))
        copy_tokenizer_files(tmp, tokenizer_dir)

    write_atomically(path, write, directory=True, check=partial(check_destination, overwrite=overwrite))


def copy_tokenizer_files(dst: str, tokenizer_dir: str | None) -> list[str]:
    """Copy tokenizer files from `tokenizer_dir`; without one, save the project's GPT-2 tokenizer if present.

    Returns the names written (empty when no tokenizer is available: the model directory is still valid).
    """
    if tokenizer_dir is not None:
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
        if not names:
            raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
        for n in names:
            shutil.copyfile(os.path.join(tokenizer_dir, n), os.path.join(dst, n))
        return names
    try:
        from tokenizer import GPT2Tokenizer  # the project's tokenizer package, built alongside this one
    except ImportError:
        return []
    before = set(os.listdir(dst))
    GPT2Tokenizer.from_pretrained("gpt2").save_pretrained(dst)
    return sorted(set(os.listdir(dst)) - before)


# ---- destinations ------------------------------------------------------------------------------------------

def is_model_dir(path: str | os.PathLike) -> bool:
    """config.json plus a weights file this project writes (model.safetensors, model.ckpt, pytorch_model.bin)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(path, n)) for n in MODEL_WEIGHT_FILES)


# What this project writes into a model directory: one holding anything else (a Hugging Face checkout's README.md
# or .git, a user's notes) is not replaced without overwrite.
MODEL_DIR_FILES = frozenset({CONFIG_NAME, *MODEL_WEIGHT_FILES, *TOKENIZER_FILES, "training.json"})


def check_destination(path: str | os.PathLike, *, overwrite: bool = False,
                      hint: str = "empty it or choose another destination") -> None:
    """Refuse a destination whose replacement would lose files: FileExistsError unless `path` is missing, an
    empty directory or a model directory holding only the files this project writes, or `overwrite` is true (a
    non-directory is refused either way)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise FileExistsError(f"destination {path} exists and is not a directory")
    if overwrite:
        return
    entries = sorted(os.listdir(path))
    if is_model_dir(path):
        others = [e for e in entries if e not in MODEL_DIR_FILES]
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise FileExistsError(f"destination {path} is a model directory that also holds {shown}, which "
                                  f"replacing it would delete; {hint}")
        return
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(f"destination {path} already exists and is not a model directory "
                              f"(it holds {shown}); {hint}")


def check_not_inside(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse a destination that is the source, or holds it, or lies inside it: replacing it would delete the
    source (`--src hf-gpt2/ --dst hf-gpt2/`)."""
    s, d = os.path.realpath(os.fspath(src)), os.path.realpath(os.fspath(dst))
    if s == d or s.startswith(d + os.sep) or d.startswith(s + os.sep):
        raise ValueError(f"the destination {dst} and the source {src} overlap: choose another destination")
