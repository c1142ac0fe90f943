"""The plugin adapter attached to a causal LM: wrapped linear modules, the active composition, checkpoints.

Each adapted projection is replaced by a ``PluginLinear`` that keeps the frozen original as ``base`` and adds
``plugin.low_rank_delta`` beside it. The composition Z (B, M, r) is not a weight: it is set per forward with
``adapter.use(z)`` and kept per thread, so a registration worker and the generation engine can share one model.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adapters.base_model import BaseModel, ModelIdentity
from adapters.encoder import EncoderConfig, PluginEncoder
from adapters.errors import CheckpointError
from adapters.plugin import low_rank_delta, subspace
from adapters.qgen import QuestionWriter
from adapters.spans import SpanSelector

FORMAT_VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"

Target = Literal["q", "k", "v", "o", "gate", "up", "down"]
TARGET_PATHS: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


class AdapterConfig(Schema):
    """Which projections of which layers are adapted, and how."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    seed: int = 0
    targets: list[Target] = Field(default_factory=lambda: list[Target](["o", "down"]))
    layers: list[int] | None = None  # None: every layer; negative indices count from the top
    u_init_std: float = Field(0.02, ge=0)  # U != 0 at init so that x has a gradient before any fit
    # A fitted with U, V (starting from the seeded random one) instead of fixed: a learned key map, so that the fit
    # can make a real question's A h land where the fold-in examples that wrote x put theirs
    learn_keys: bool = False
    # Core plugins: each module's share of x is an r x keys matrix over a key map A of `keys` rows (plugin.py), not r
    # numbers that scale r fixed key-value pairs. None: the diagonal plugin (README, "Core plugins").
    keys: int | None = Field(None, ge=1, le=4096)
    # False: no shared term (V = 0, never fitted or stored), so z = 0 is exactly the bare model and `combine` with
    # no plugin is classic RAG; U then learns only to read plugins (README, "No shared term")
    shared_term: bool = True
    # False: with paragraphs in the prompt (`combine`, and the fit's reading examples) the shared term is off, so the
    # shared term is the closed-book reader and `combine` with no plugin is classic RAG (README, "No shared term")
    shared_in_reading: bool = True
    encoder: EncoderConfig | None = None


class _Composition(threading.local):
    z: Tensor | None = None  # (B, M, r)
    gate: Tensor | None = None  # (B,): 0 turns the adapter off for that row
    shared: Tensor | None = None  # (B,): the weight of the shared term V h for that row (None: 1)


class PluginLinear(nn.Module):
    """A frozen linear module plus s * U (V h + z * (A h)) (or a core's Z (A h) / sqrt(k)), z read from the adapter's
    active composition."""

    def __init__(
        self,
        base: nn.Linear,
        index: int,
        rank: int,
        scale: float,
        seed: int,
        u_std: float,
        state: _Composition,
        learn_keys: bool = False,
        shared_term: bool = True,
        keys: int | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        # the module's row of z, as a tensor: an int attribute would specialise a compiled layer to this module
        # (torch.compile guards on it), where a tensor lets every adapted layer share one compiled graph
        self.slot: Tensor
        self.register_buffer("slot", torch.tensor([index]), persistent=False)
        self.scale = scale
        out_f, in_f = base.out_features, base.in_features
        gen = torch.Generator().manual_seed(seed * 7919 + index)
        self.U = nn.Parameter(torch.randn(out_f, rank, generator=gen) * u_std)  # (out, r)
        self.V: nn.Parameter | None
        if shared_term:
            self.V = nn.Parameter(torch.zeros(rank, in_f))  # (r, in): x = 0 starts as the bare base model
        else:
            self.register_parameter("V", None)
        A = subspace(seed, index, keys or rank, in_f)  # (k, in); k = r for diagonal plugins
        self.A: Tensor
        if learn_keys:
            self.A = nn.Parameter(A)
        else:
            self.register_buffer("A", A, persistent=False)  # regenerated from the seed, never stored
        self._state = state

    def forward(self, h: Tensor) -> Tensor:  # h (B, T, in)
        st = self._state
        zm = None if st.z is None else st.z.index_select(1, self.slot)[:, 0]  # (B, P)
        if zm is None and self.V is None:
            return self.base(h)
        delta = low_rank_delta(h, self.U, self.V, self.A, zm, self.scale, st.gate, st.shared)  # (B, T, out)
        return self.base(h) + delta


def _resolve_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    resolved = sorted({i % n_layers for i in layers if -n_layers <= i < n_layers})
    if len(resolved) != len(set(layers)):
        raise CheckpointError(f"adapter layers {layers} do not fit a model of {n_layers} layers")
    return resolved


class PluginAdapter(nn.Module):
    """Shared U, V (and an optional plugin encoder) attached to one base model."""

    def __init__(self, base: BaseModel, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.identity = base.identity
        self._state = _Composition()
        decoder_layers = base.model.model.layers
        self.layer_ids = _resolve_layers(config.layers, len(decoder_layers))
        self.module_names: list[str] = []
        wrapped: list[PluginLinear] = []
        scale = config.alpha / config.rank
        for layer_id in self.layer_ids:
            for target in config.targets:
                parent_path, attr = TARGET_PATHS[target].split(".")
                parent = getattr(decoder_layers[layer_id], parent_path)
                original = getattr(parent, attr)
                if isinstance(original, PluginLinear):
                    raise CheckpointError("this base model already carries a plugin adapter")
                module = PluginLinear(
                    original,
                    len(wrapped),
                    config.rank,
                    scale,
                    config.seed,
                    config.u_init_std,
                    self._state,
                    config.learn_keys,
                    config.shared_term,
                    config.keys,
                )
                setattr(parent, attr, module)
                wrapped.append(module)
                self.module_names.append(f"layers.{layer_id}.{TARGET_PATHS[target]}")
        self.plugin_modules: list[PluginLinear] = wrapped
        self.wrapped = nn.ModuleList(wrapped)  # registers them as submodules
        self.encoder = PluginEncoder(config.encoder, base, self.plugin_shape) if config.encoder else None
        self.lowest_layer = min(self.layer_ids)
        # frozen until fit thaws them: fold-in and generation must not compute (or accumulate) their gradients
        for p in self.shared_parameters():
            p.requires_grad_(False)

    @property
    def plugin_shape(self) -> tuple[int, int]:
        """(M, P): one row per adapted module, of r numbers (P = r), or an r x k core (P = r * k)."""
        return (len(self.module_names), self.config.rank * (self.config.keys or 1))

    @property
    def plugin_bytes(self) -> int:
        m, r = self.plugin_shape
        return m * r * 2  # float16 at rest, the store's default format (index/codec.py)

    def shared_parameters(self) -> list[nn.Parameter]:
        """U and V of every module (A too when learned, and the encoder's weights): what fit learns, what fold-in
        freezes."""
        params = [p for m in self.plugin_modules for p in (m.U, m.V) if p is not None]
        params += [m.A for m in self.plugin_modules if isinstance(m.A, nn.Parameter)]  # learned keys only
        if self.encoder is not None:
            params += self.encoder.trainable_parameters()
        return params

    @contextmanager
    def use(self, z: Tensor | None, gate: Tensor | None = None, shared: Tensor | None = None) -> Iterator[None]:
        """Apply composition z (B, M, r) (or (M, r), broadcast) to forwards on this thread; None means z = 0.

        gate (B,) optionally scales each row's delta: 0 gives that row the bare base model; shared (B,) scales each
        row's shared term V h: 0 gives that row the plugins' term alone.
        """
        if z is not None:
            if z.dim() == 2:
                z = z[None]
            if tuple(z.shape[1:]) != self.plugin_shape:
                raise ValueError(f"composition of shape {tuple(z.shape)}, adapter wants (B, {self.plugin_shape})")
        state = self._state
        previous = (state.z, state.gate, state.shared)
        state.z, state.gate, state.shared = z, gate, shared
        try:
            yield
        finally:
            state.z, state.gate, state.shared = previous

    # ---- checkpoints -------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for i, m in enumerate(self.plugin_modules):
            tensors[f"U.{i}"] = m.U.detach().contiguous()
            if m.V is not None:
                tensors[f"V.{i}"] = m.V.detach().contiguous()
            if self.config.learn_keys:
                tensors[f"A.{i}"] = m.A.detach().contiguous()
        if self.encoder is not None:
            for name, t in self.encoder.trainable_state().items():
                tensors[f"encoder.{name}"] = t.detach().contiguous()
        return tensors

    def save(self, folder: Path, extra: dict[str, object] | None = None, half: bool = False) -> str:
        """Write the checkpoint (safetensors + JSON): weights first, config last, each by rename. Returns its id.

        half stores float16 (loading casts back to float32), for checkpoints shipped in the repository.
        """
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        tensors = self.state_tensors()
        if half:
            tensors = {k: v.half() for k, v in tensors.items()}
        save_file(tensors, str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.model_dump(),
            "base_model": {"name": self.identity.name, "sha256": self.identity.sha256},
            "seed": self.config.seed,
            "created_at": time.time(),
            "extra": extra or {},
        }
        tmp_meta = folder / (CONFIG_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        tmp_meta.replace(folder / CONFIG_FILE)
        return checkpoint_id(folder)

    @classmethod
    def load(cls, folder: Path, base: BaseModel) -> PluginAdapter:
        """Attach a saved adapter to base; a checkpoint of another base model is refused."""
        meta = read_checkpoint_meta(folder)
        recorded = ModelIdentity(**meta["base_model"])
        if recorded.sha256 != base.identity.sha256:
            raise CheckpointError(
                f"adapter {folder} was fitted on base model {recorded.name} (sha256 {recorded.sha256[:12]}), "
                f"not on the loaded {base.identity.name} (sha256 {base.identity.sha256[:12]})"
            )
        adapter = cls(base, AdapterConfig.model_validate(meta["config"]))
        tensors = load_file(str(folder / WEIGHTS_FILE))
        names = "U" + "V" * adapter.config.shared_term + "A" * adapter.config.learn_keys
        missing = [f"{n}.{i}" for i in range(len(adapter.plugin_modules)) for n in names if f"{n}.{i}" not in tensors]
        if missing:
            raise CheckpointError(f"{folder / WEIGHTS_FILE} lacks {', '.join(missing[:4])}: not this config's weights")
        with torch.no_grad():
            for i, m in enumerate(adapter.plugin_modules):
                for n in names:
                    getattr(m, n).copy_(tensors[f"{n}.{i}"].float())
            if adapter.encoder is not None:
                adapter.encoder.load_trainable_state(
                    {k.removeprefix("encoder."): v.float() for k, v in tensors.items() if k.startswith("encoder.")}
                )
        adapter.checkpoint_id = checkpoint_id(folder)
        adapter.writer = QuestionWriter.load(folder, base.model)
        adapter.selector = SpanSelector.load(folder, base.model)
        return adapter

    checkpoint_id: str | None = None
    writer: QuestionWriter | None = None  # fold-in's question writer, when the checkpoint folder has one
    selector: SpanSelector | None = None  # fold-in's span selector, likewise


def read_checkpoint_meta(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_FILE
    if not config_path.exists() or not (folder / WEIGHTS_FILE).exists():
        raise CheckpointError(f"no adapter checkpoint in {folder} (run `kplug fit` or `kplug adapter default`)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return dict(meta)


def checkpoint_id(folder: Path) -> str:
    """A short content hash of the checkpoint's weights and config: what stored plugins belong to."""
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        data = (folder / name).read_bytes()
        if name == CONFIG_FILE:  # the creation time must not change the id of identical weights
            meta = json.loads(data)
            meta.pop("created_at", None)
            data = json.dumps(meta, sort_keys=True).encode()
        digest.update(data)
    return digest.hexdigest()[:16]
