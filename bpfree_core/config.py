"""One typed config tree, loaded from TOML and `--set section.key=value` overrides.

Every field has a default, a unit where it has one, and is validated in `__post_init__`.
Overrides are coerced to the declared field type; unknown keys are rejected with the valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfree_core.errors import ConfigError
from bpfree_core.seeds import SEED_SPACE

# the rules bpfree_core.objectives ships (one module each); plug-ins and files add to them
BUILTIN_RULES = ("ff", "symba", "sffa", "ffcl", "uff", "bp", "cwc", "mono", "deeper", "asge")
RULE_PLUGINS = "bpfree.objectives"   # the entry-point group of installed rules
DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")   # built in; or npz: csv: folder:
WIRE_DTYPES = ("float32", "bfloat16", "float16", "int8")
DATA_PLANES = ("grpc", "tcp")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")   # Ray placement-group strategies
# Every field is one of three kinds, declared where it is defined:
# - computed (the default): what a run computes; travels to workers and clients, is compared whole
#   when a run resumes, and names the run (`ExperimentConfig.fingerprint`);
# - RUNTIME: where and how it runs (device, threads, data dir, timeouts, window, chunking, TLS,
#   Ray, stage count, executor); may change on resume, never changes the weights (threads only in
#   the last bits, see the golden rule);
# - SECRET: runtime and never serialised (`to_dict` leaves it out; it comes from --set,
#   $BPFREE_TOKEN or a node's own settings).
RUNTIME = types.MappingProxyType({"kind": "runtime"})
SECRET = types.MappingProxyType({"kind": "secret"})


PRECISIONS = ("float32", "bf16")


def runtime(default: Any) -> Any:
    """A field saying where or how a run runs, not what it computes."""
    return field(default=default, metadata=RUNTIME)


def secret(default: Any) -> Any:
    """A runtime field that is never serialised (and never shown in a repr)."""
    return field(default=default, metadata=SECRET, repr=False)


MAX_LR = 10.0   # learning rates above this only diverge (1e30 trained to chance, silently)


def _check_choice(section: str, name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{section}.{name} = {value!r} is not valid; choose one of {', '.join(valid)}")


def check_device_name(device: str, what: str = "device") -> int | None:
    """cpu, cuda or cuda:N (N a whole number >= 0), or one sentence; the GPU index, if any. Where
    the device exists is runtime.resolve_device's to say."""
    kind, sep, index = str(device).partition(":")
    if device == "cpu" or (kind == "cuda" and not sep):
        return None
    if kind == "cuda" and index.isdigit():
        return int(index)
    raise ConfigError(f"{what} = {device!r} is not a device; use cpu, cuda or cuda:N (N = 0, 1, ...)")


def stage_device(devices: str, stage: int) -> str:
    """Stage `stage`'s device in a comma-separated list ("cuda:0,cuda:1": stage s on entry s mod
    the list's length; one entry: every stage on it; "" stays "", a worker's own --device)."""
    entries = [d.strip() for d in devices.split(",") if d.strip()]
    return entries[stage % len(entries)] if entries else ""


def is_outside_rule(name: str) -> bool:
    """A rule named by its code's place (pkg.module:Class or path/to/rule.py:Class), not by name."""
    return ":" in name


def check_rule_name(name: str) -> None:
    """model.algorithm names a built-in rule, an installed plug-in (read from the packages'
    metadata, nothing imported) or a rule's code by its place; else one sentence. The code itself
    is imported where the rule is built (bpfree_core.objectives.resolve), never by a config."""
    if name in BUILTIN_RULES:
        return
    if is_outside_rule(name):
        where, _, attr = name.rpartition(":")
        module = where.endswith(".py") or all(p.isidentifier() for p in where.split("."))
        if where and attr.isidentifier() and module:
            return
        raise ConfigError(f"model.algorithm = {name!r} is not pkg.module:Class or "
                          "path/to/rule.py:Class")
    from importlib.metadata import entry_points

    plugins = {ep.name for ep in entry_points(group=RULE_PLUGINS)}
    if name not in plugins:
        raise ConfigError(f"model.algorithm = {name!r} is not a known rule; valid: "
                          f"{', '.join(sorted([*BUILTIN_RULES, *plugins]))}, or your own as "
                          "pkg.module:Class or path/to/rule.py:Class")


def _check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{section}.{name} = {value!r} is not a finite number; give a real value")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name} = {value!r} must be {bound}")


@dataclass(frozen=True)
class ModelConfig:
    algorithm: str = "ff"                          # a rule of bpfree_core.objectives' registry,
                                                   # or your own: pkg.module:Class | file.py:Class
    dataset: str = "mnist"                         # one of DATASETS
    hidden: tuple[int, ...] = (500, 500)           # units per hidden layer, in order
    conv: tuple[int, ...] = ()                     # conv channels before `hidden` (uff, bp, cwc,
                                                   # deeper)
    num_classes: int = 0                           # labels the model tells apart (0 = the dataset's;
                                                   # domain-incremental continual learning sets 2)
    # your own data (model.dataset = npz:PATH | csv:DIR | folder:PATH): filled in when the run
    # starts (bpfree_core.data.datasets.bind_data), so every process agrees without reading the files
    input_shape: tuple[int, ...] = ()              # per-sample (C, H, W); (1, 1, D) for features
    data_classes: int = 0                          # classes in the data
    data_fingerprint: str = ""                     # content hash: a resumed run refuses new data

    def __post_init__(self) -> None:
        where, sep, cls = self.algorithm.rpartition(":")
        if sep and where.endswith(".py") and not Path(where).is_absolute():   # every process
            object.__setattr__(self, "algorithm", f"{Path(where).resolve()}:{cls}")
        check_rule_name(self.algorithm)   # its form only: a rule's code is imported where it is used
        if self.num_classes == 1 or self.num_classes < 0:
            raise ConfigError(f"model.num_classes = {self.num_classes}: give 0 (the dataset's) or >= 2")
        if ":" in self.dataset:   # your own data: bpfree_core.data.readers names the sources
            from bpfree_core.data.readers import reader

            reader(self.dataset)   # a known source and a path, or one sentence
        else:
            _check_choice("model", "dataset", self.dataset, DATASETS)
        if not self.hidden and not self.conv:
            raise ConfigError("model.hidden is empty: give at least one layer size, e.g. [500, 500]")
        for i, n in enumerate(self.hidden):
            if not isinstance(n, int) or n < 2:
                raise ConfigError(f"model.hidden[{i}] = {n!r}: every layer needs an integer >= 2 units")
        for i, c in enumerate(self.conv):
            if not isinstance(c, int) or c < 1:
                raise ConfigError(f"model.conv[{i}] = {c!r}: every conv layer needs >= 1 channel")


@dataclass(frozen=True)
class ObjectiveConfig:
    goodness: str = "sum"          # ff: sum | mean of squared activities (mean = logits / width)
    threshold: float = -1.0        # ff: goodness threshold; < 0: layer width (sum), 1 (mean)
    temperature: float = 1.0       # ff: p(positive) = sigmoid((G - threshold) / temperature)
    alpha: float = 4.0             # symba: scale of the goodness gap
    peer_weight: float = 0.03      # ff/symba: peer-normalisation penalty weight (0 = off)
    straight_through: bool = True  # ff/symba/sffa: ReLU passes full gradient (avoids dead units)
    pattern_bits: int = 100        # symba/sffa: length of the class pattern
    pattern_density: float = 0.1   # symba/sffa: Bernoulli p of a pattern bit
    icp: bool = True               # symba: carry the intrinsic class pattern into every layer
    margin: float = 0.8            # ffcl: cosine margin for mismatched pairs (0 collapses ReLU codes)
    noise_std: float = 0.3         # uff: denoising noise (0 = plain autoencoder)
    head: bool = True              # train a local softmax readout head per layer
    vote_first: bool = False       # ff/symba/sffa: the first layer also votes in prediction
    negatives: str = "uniform"     # ff/symba/sffa: uniform wrong label | hard: drawn from the
                                   # first layer's head, in proportion to its wrong-label belief |
                                   # seen (sffa): BCE over every class seen so far, each a candidate
    activation: str = "relu"       # sffa: relu | sigmoid (the SFFA authors' units)
    top_k: int = 0                 # sffa: keep the k largest units of each half (authors: 15; 0 = all)
    input_skip: bool = False       # sffa: layers after the first also get the image and the
                                   # class code beside the last layer's output (the authors' residual)
    input_norm: str = "rms"        # ff/symba/sffa: rms-normalise each layer's input | none (SFFA's code)
    patch_alpha: float = 1.0       # asge: P = round(sqrt(C_last / C) ^ alpha) patches per side
    vote_layers: tuple[int, ...] = ()   # exactly these layers vote in prediction (DeeperForward's
                                   # chosen range, e.g. 2,3,4,5); () = the rule's own choice
    shortcut: str = "add"          # deeper: add (residual where shapes agree) | pad (also where
                                   # they change: 2x2 mean pool + zero channels) | none

    def __post_init__(self) -> None:
        _check_choice("objective", "goodness", self.goodness, ("sum", "mean"))
        _check_choice("objective", "negatives", self.negatives, ("uniform", "hard", "seen"))
        _check_choice("objective", "activation", self.activation, ("relu", "sigmoid"))
        _check_positive("objective", "top_k", self.top_k, allow_zero=True)
        _check_choice("objective", "input_norm", self.input_norm, ("rms", "none"))
        _check_choice("objective", "shortcut", self.shortcut, ("add", "pad", "none"))
        if any(not isinstance(i, int) or i < 0 for i in self.vote_layers):
            raise ConfigError(f"objective.vote_layers = {list(self.vote_layers)}: give layer "
                              "indices (0 = the first layer), e.g. 2,3,4")
        _check_positive("objective", "alpha", self.alpha)
        _check_positive("objective", "patch_alpha", self.patch_alpha, allow_zero=True)
        _check_positive("objective", "temperature", self.temperature)
        _check_positive("objective", "peer_weight", self.peer_weight, allow_zero=True)
        _check_positive("objective", "pattern_bits", self.pattern_bits)
        if not 0 < self.pattern_density < 1:
            raise ConfigError(f"objective.pattern_density = {self.pattern_density} must be in (0, 1)")
        _check_positive("objective", "noise_std", self.noise_std, allow_zero=True)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"        # adam | sgd
    lr: float = 2e-3               # layer learning rate (tuned on MNIST: bench/results/accuracy.md)
    momentum: float = 0.9          # sgd only
    weight_decay: float = 0.0
    head_lr: float = 1e-2          # readout-head learning rate
    cooldown: bool = True          # linear lr decay to 0 over the second half of training
    kernels: str = "auto"          # optimiser kernels: auto (fused on CUDA, foreach elsewhere) |
                                   # foreach | fused (1.2x on CPU, other last bits) | single

    def __post_init__(self) -> None:
        _check_choice("optim", "optimizer", self.optimizer, ("adam", "sgd"))
        _check_choice("optim", "kernels", self.kernels, ("auto", "foreach", "fused", "single"))
        for name in ("lr", "head_lr"):
            _check_positive("optim", name, getattr(self, name))
            if getattr(self, name) > MAX_LR:
                raise ConfigError(f"optim.{name} = {getattr(self, name):g} is far above any learning "
                                  f"rate that trains (> {MAX_LR:g}); typical values are 1e-4 .. 1e-1")
        _check_positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim", "momentum", self.momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ConfigError(f"optim.momentum = {self.momentum:g} must be below 1 (0.9 is usual)")


def _check_layer_epochs(stops: tuple[int, ...], epochs: int) -> None:
    if any(not isinstance(n, int) or not 1 <= n <= epochs for n in stops):
        raise ConfigError(f"train.layer_epochs = {list(stops)}: give each layer a whole number of "
                          f"epochs in 1..train.epochs ({epochs})")
    if list(stops) != sorted(stops):
        raise ConfigError(f"train.layer_epochs = {list(stops)} must not decrease: a layer trains at "
                          "least as long as the layers before it (its input must be settled first)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 100
    seed: int = 0
    train_limit: int = 0           # use only the first N training images (0 = all)
    test_limit: int = 0            # evaluate on the first N test images (0 = all)
    validation: int = 0            # hold out the last N training images (after train_limit):
                                   # never trained on, scored every epoch/round; choose recipes
                                   # on it, not on the test set
    diagnostics_every: int = runtime(1)   # per-layer diagnostics every N epochs (and the last;
                                   # 0 = the last only): on a GPU they cost a CPU pass
    patience: int = 0              # stop after N epochs without a better validation accuracy and
                                   # end with the best epoch's weights (0 = off; needs validation)
    eval_limit: int = runtime(0)   # per-epoch test (and train) accuracy on the first N images
                                   # only; the last epoch always scores the whole test set (0 = all)
    threads: int = runtime(0)      # torch threads (0 = torch default)
    device: str = runtime("cpu")   # cpu | cuda | cuda:N
    predict: str = "softmax"       # softmax | goodness | both (goodness: ff, symba, sffa only)
    jitter: int = 0                # shift training images by up to +-N pixels (Hinton: 2; 0 = off)
    precision: str = "float32"     # float32 | bf16 (autocast: matmuls in bfloat16, weights and
                                   # every tensor between layers stay float32)
    tf32: bool = False             # CUDA float32 matmuls and convolutions on TF32 tensor cores
                                   # (Ampere and later: ~8x the float32 rate, 10-bit mantissa)
    compile: bool = False          # torch.compile each layer's forward + loss (ff, symba, sffa,
                                   # mono): fused elementwise work, other float bits (opt-in)
    layer_epochs: tuple[int, ...] = ()   # staged schedule (CwComp): layer l trains for the first
                                   # N_l epochs, then freezes (no step, hands on its output);
                                   # one count per layer, non-decreasing (() = all, every epoch)
    cache_frozen: bool = runtime(True)   # frozen layers' per-sample outputs are kept, not
                                   # recomputed each epoch (same weights; bpfree_core.frozen)
    one_pass: bool = False         # ff, symba, sffa: positive and negative data through a layer
                                   # as one batch (one matmul each way, not two), other float bits
    data_dir: str = runtime("")    # local dataset dir; "" = $BPFREE_DATA_DIR, else download cache

    def __post_init__(self) -> None:
        _check_positive("train", "epochs", self.epochs)
        _check_positive("train", "batch_size", self.batch_size)
        _check_positive("train", "train_limit", self.train_limit, allow_zero=True)
        _check_positive("train", "test_limit", self.test_limit, allow_zero=True)
        _check_positive("train", "validation", self.validation, allow_zero=True)
        _check_positive("train", "eval_limit", self.eval_limit, allow_zero=True)
        _check_positive("train", "patience", self.patience, allow_zero=True)
        if self.train_limit and self.validation >= self.train_limit:
            raise ConfigError(f"train.validation = {self.validation} leaves nothing of "
                              f"train.train_limit = {self.train_limit} to train on; hold out fewer")
        if not isinstance(self.seed, int) or not 0 <= self.seed < SEED_SPACE:
            raise ConfigError(f"train.seed = {self.seed!r}: give a whole number in 0..{SEED_SPACE - 1}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"train.threads = {self.threads!r}: give a whole number >= 0 "
                              "(0 = torch's default)")
        if not isinstance(self.jitter, int) or not 0 <= self.jitter <= 8:
            raise ConfigError(f"train.jitter = {self.jitter!r}: give whole pixels in 0..8 (2 is "
                              "Hinton's jitter)")
        _check_choice("train", "predict", self.predict, ("softmax", "goodness", "both"))
        _check_choice("train", "precision", self.precision, PRECISIONS)
        _check_layer_epochs(self.layer_epochs, self.epochs)
        check_device_name(self.device, "train.device")


@dataclass(frozen=True)
class PipelineConfig:
    stages: int = runtime(2)              # stage workers per client; layers are split contiguously
    wire_dtype: str = "float32"           # activations on the wire: float32 | bfloat16 | float16 | int8
    window: int = runtime(4)              # max in-flight batches per link (backpressure)
    chunk_bytes: int = runtime(1 << 20)   # tensor chunk size on the wire (bytes)
    data_plane: str = runtime("tcp")      # how activations travel between stages: tcp (the
                                          # frames on a socket beside gRPC: client/tcp_plane.py;
                                          # a second port per worker, --data-listen) | grpc (the
                                          # Push / Pull streams on the gRPC port; ~2.5x slower)
    rpc_timeout: float = runtime(60.0)    # deadline of one RPC (seconds)
    connect_timeout: float = runtime(30.0)  # deadline to reach a peer, retries included (seconds)
    token: str = secret("")               # shared secret checked on every RPC ("" = none)
    devices: str = runtime("")            # launched stage workers' devices, one per stage, e.g.
                                          # cuda:0,cuda:1 (cycled over the stages; "" = train.device)
    session: str = runtime("")            # the run that drives the workers: a worker serves one
                                          # session at a time ("" = this driver process's own)
    tls_ca: str = runtime("")             # CA (PEM) that signed the workers' TLS certificates ("" = off)
    stage_num_cpus: float = runtime(1.0)  # ray backend: CPUs each stage actor reserves
    stage_num_gpus: float = runtime(0.0)  # ray backend: GPUs each stage actor reserves (0 = CPU stage)
    bind_host: str = runtime("")          # ray backend: host stage actors serve on ("" = the node's IP)
    restarts: int = runtime(2)            # reruns of a client's round after a stage failure (0 = none)
    balance: str = runtime("layers")      # how layers split into stages: layers (equal counts) |
                                          # flops (by multiply-adds) | measured (by timed layer
                                          # steps): bpfree_core/balance.py
    pool: int = runtime(0)                # simulate: P pipelines (P x S workers) serve the sampled
                                          # clients in turn (0 = one pipeline per client)
    client_stages: str = runtime("")      # "K=S,K=S": clients running their own number of stages
                                          # (the rest run pipeline.stages); weights do not change

    def __post_init__(self) -> None:
        _check_positive("pipeline", "stages", self.stages)
        _check_positive("pipeline", "pool", self.pool, allow_zero=True)
        self.stage_counts()   # names a malformed client_stages
        _check_positive("pipeline", "stage_num_cpus", self.stage_num_cpus, allow_zero=True)
        _check_positive("pipeline", "stage_num_gpus", self.stage_num_gpus, allow_zero=True)
        if self.stage_num_cpus == 0 and self.stage_num_gpus == 0:
            raise ConfigError("pipeline.stage_num_cpus and pipeline.stage_num_gpus are both 0; a Ray "
                              "stage must reserve some CPU or GPU (e.g. stage_num_cpus = 1)")
        if self.stage_num_gpus > 1 and not float(self.stage_num_gpus).is_integer():
            raise ConfigError(f"pipeline.stage_num_gpus = {self.stage_num_gpus}: above 1 it must be "
                              "a whole number of GPUs (fractions are for sharing one GPU)")
        _check_choice("pipeline", "wire_dtype", self.wire_dtype, WIRE_DTYPES)
        _check_choice("pipeline", "data_plane", self.data_plane, DATA_PLANES)
        _check_positive("pipeline", "window", self.window)
        _check_positive("pipeline", "chunk_bytes", self.chunk_bytes)
        _check_positive("pipeline", "rpc_timeout", self.rpc_timeout)
        _check_positive("pipeline", "connect_timeout", self.connect_timeout)
        _check_positive("pipeline", "restarts", self.restarts, allow_zero=True)
        for device in filter(None, (d.strip() for d in self.devices.split(","))):
            check_device_name(device, "pipeline.devices entry")
        _check_choice("pipeline", "balance", self.balance, ("flops", "layers", "measured"))

    def stage_counts(self) -> dict[int, int]:
        """{client: stages} for the clients `client_stages` gives a count of their own."""
        counts: dict[int, int] = {}
        for part in filter(None, (p.strip() for p in self.client_stages.split(","))):
            key, sep, value = part.partition("=")
            try:
                client, stages = int(key), int(value)
            except ValueError:
                client, stages = -1, 0
            if not sep or client < 0 or stages < 1:
                raise ConfigError(f"pipeline.client_stages has {part!r}: give CLIENT=STAGES pairs, "
                                  "e.g. \"0=1,3=3\" (client ids from 0, at least one stage)")
            counts[client] = stages
        return counts

    def stages_of(self, client: int) -> int:
        """How many stage workers client `client` runs its layers on."""
        return self.stage_counts().get(client, self.stages)


def train_sample_size(clients: int, fraction: float, minimum: int) -> int:
    """Clients that train each round: Flower's max(int(K * fraction_train), min_train_nodes),
    capped at K (Flower would wait for nodes that will never come)."""
    return min(clients, max(int(clients * fraction), minimum, 1))


@dataclass(frozen=True)
class FederationConfig:
    clients: int = 3                      # K federated clients
    rounds: int = 3
    local_epochs: int = 1                 # epochs each client trains per round
    partition: str = "iid"                # iid | dirichlet:ALPHA | shards:N | natural[:label]
    min_partition_size: int = 0           # every client holds at least this many samples (Dirichlet redraws)
    min_clients: int = runtime(0)         # replies needed to aggregate a round (0 = all sampled)
    fraction_train: float = 1.0           # share of the K clients sampled to train each round
    min_train_clients: int = 2            # sample at least this many (at most K), as Flower's min_train_nodes
    fraction_evaluate: float = runtime(0.0)  # share of clients scoring the global model on their test data
    min_evaluate_clients: int = runtime(2)   # at least this many of them (at most K)
    proximal_mu: float = 0.0              # FedProx proximal term on the clients (0 = none)
    strategy: str = "fedavg"              # server strategy: federation/strategies/ (Flower's maths)
    strategy_args: str = ""               # its hyper-parameters, Flower's names: "eta=0.01,beta_1=0.9"
    dp: str = ""                          # "" | fixed | adaptive: Flower's server-side DP clipping
    dp_args: str = ""                     # its parameters: "noise_multiplier=0.5,clipping_norm=5"
    round_timeout: float = runtime(600.0) # seconds the coordinator waits for replies
    executor: str = runtime("pipeline")   # pipeline (S stage workers over gRPC) | inprocess (one process)
    backend: str = runtime("flower")      # flower (Flower simulation engine) | ray (stage actors on Ray)
    ray_address: str = runtime("")        # ray backend: "" = start Ray here; auto | HOST:PORT = join one
    placement: str = runtime("PACK")      # ray backend: how a client's stages spread over nodes

    def __post_init__(self) -> None:
        _check_positive("federation", "clients", self.clients)
        _check_positive("federation", "rounds", self.rounds)
        _check_positive("federation", "local_epochs", self.local_epochs)
        _check_positive("federation", "min_clients", self.min_clients, allow_zero=True)
        _check_positive("federation", "min_partition_size", self.min_partition_size, allow_zero=True)
        if self.min_clients > self.clients:
            raise ConfigError(
                f"federation.min_clients = {self.min_clients} exceeds federation.clients = "
                f"{self.clients}"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"federation.fraction_train = {self.fraction_train} must be in (0, 1]: "
                              "the share of clients that train each round")
        _check_positive("federation", "min_train_clients", self.min_train_clients)
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(f"federation.fraction_evaluate = {self.fraction_evaluate} must be in [0, 1] "
                              "(0 = no federated evaluation)")
        _check_positive("federation", "min_evaluate_clients", self.min_evaluate_clients)
        sampled = train_sample_size(self.clients, self.fraction_train, self.min_train_clients)
        if self.min_clients > sampled:
            raise ConfigError(
                f"federation.min_clients = {self.min_clients} exceeds the {sampled} clients sampled "
                f"per round (federation.fraction_train = {self.fraction_train} of {self.clients}, at "
                f"least federation.min_train_clients = {self.min_train_clients}); lower min_clients "
                "or sample more clients")
        _check_positive("federation", "proximal_mu", self.proximal_mu, allow_zero=True)
        _check_positive("federation", "round_timeout", self.round_timeout)
        _check_choice("federation", "executor", self.executor, ("pipeline", "inprocess"))
        _check_choice("federation", "backend", self.backend, ("flower", "ray"))
        _check_choice("federation", "placement", self.placement, PLACEMENTS)
        from bpfree_core.data.partition import parse_partition  # local: partition imports config-free
        from bpfree_core.federation.strategies import build_strategy

        parse_partition(self.partition)
        build_strategy(self.strategy, self.strategy_args, self.dp, self.dp_args,
                       num_sampled_clients=sampled)


SCENARIOS = ("class", "domain", "task")
STRATEGIES = ("naive", "replay", "ewc", "si", "agem")


@dataclass(frozen=True)
class ContinualConfig:
    """`bpfree continual`: the dataset split into tasks that arrive one after another."""

    tasks: int = 5                 # the classes split evenly into this many tasks (SplitMNIST: 5 x 2)
    class_order: str = "fixed"     # fixed (0,1 | 2,3 | ...) | shuffled (by train.seed)
    scenario: str = "class"        # class: one head over every class seen | domain: the within-task
                                   # label (2-way) | task: task id known at test (its classes only)
    strategy: str = "naive"        # naive | replay | ewc | si | agem
    epochs_per_task: int = 2
    memory: int = 500              # replay, agem: samples kept from past tasks (split evenly per task)
    ewc_lambda: float = 1e5        # ewc: penalty lambda * sum F (w - w*)^2, per past task
    si_c: float = 1.0              # si: penalty c * sum Omega (w - w*)^2
    si_damping: float = 1e-3       # si: xi in Omega = omega / (delta^2 + xi)
    federated: bool = False        # bpfree simulate / flwr run train the task stream: each client
                                   # its share of the current task (+ its own replay memory);
                                   # federation.rounds split evenly over the tasks
    client_order: str = "same"     # federated: same task order on every client | shuffled per client

    def __post_init__(self) -> None:
        _check_positive("continual", "tasks", self.tasks)
        _check_choice("continual", "class_order", self.class_order, ("fixed", "shuffled"))
        _check_choice("continual", "scenario", self.scenario, SCENARIOS)
        _check_choice("continual", "strategy", self.strategy, STRATEGIES)
        _check_positive("continual", "epochs_per_task", self.epochs_per_task)
        _check_positive("continual", "memory", self.memory, allow_zero=True)
        _check_positive("continual", "ewc_lambda", self.ewc_lambda, allow_zero=True)
        _check_positive("continual", "si_c", self.si_c, allow_zero=True)
        _check_positive("continual", "si_damping", self.si_damping)
        _check_choice("continual", "client_order", self.client_order, ("same", "shuffled"))
        if self.strategy in ("replay", "agem") and self.memory == 0:
            raise ConfigError(f"continual.strategy = {self.strategy!r} needs continual.memory > 0 "
                              "samples")


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the secrets: what may be written to disk or sent to another party.

        The shared token is never serialised: a resumed run takes it from $BPFREE_TOKEN or --set.
        """
        return self._select(lambda kind: kind != "secret")

    def computed_dict(self) -> dict[str, Any]:
        """What the run computes: equal for two runs that must end with the same weights."""
        return self._select(lambda kind: kind == "computed")

    def runtime_dict(self) -> dict[str, Any]:
        """Where and how it runs (secrets left out)."""
        return self._select(lambda kind: kind == "runtime")

    def fingerprint(self) -> str:
        """A short hash of `computed_dict()`: runs with the same fingerprint compute the same."""
        blob = json.dumps(self.computed_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _select(self, keep: Any) -> dict[str, Any]:
        full = dataclasses.asdict(self)
        return {section: {f.name: full[section][f.name] for f in dataclasses.fields(_section_type(section))
                          if keep(field_kind(section, f.name))}
                for section in full}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build from nested dicts (TOML or JSON), rejecting unknown sections and keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a table of [section] tables, not {type(data).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, values in data.items():
            if name not in sections:
                raise ConfigError(
                    f"unknown config section [{name}]; valid sections: {', '.join(sections)}"
                )
            if not isinstance(values, dict):
                raise ConfigError(f"config section [{name}] must be a table of key = value")
            section_cls = _section_type(name)
            kwargs[name] = _build_section(name, section_cls, values)
        return cls(**kwargs)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> ExperimentConfig:
        """Apply `section.key=value` strings, each coerced to the field's declared type."""
        data = dataclasses.asdict(self)   # secrets included: overriding one key keeps the token
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            path, raw = item.split("=", 1)
            parts = path.strip().split(".")
            if len(parts) != 2:
                raise ConfigError(f"override {item!r}: the key must be section.key, e.g. train.epochs")
            section, key = parts
            if section not in data:
                raise ConfigError(
                    f"override {item!r}: unknown section {section!r}; valid: {', '.join(data)}"
                )
            fields = {f.name: f for f in dataclasses.fields(_section_type(section))}
            if key not in fields:
                raise ConfigError(
                    f"override {item!r}: unknown key {section}.{key}; valid keys: "
                    f"{', '.join(fields)}"
                )
            data[section][key] = _coerce(f"{section}.{key}", _field_type(section, key), raw.strip())
        return ExperimentConfig.from_dict(data)


# The schema is fixed at import: its type hints are resolved once (get_type_hints evaluates every
# annotation string; per call it made to_dict cost 13 ms, paid on every round's message).
@functools.cache
def field_kind(section: str, key: str) -> str:
    """"computed", "runtime" or "secret" (see RUNTIME and SECRET above)."""
    f = next(f for f in dataclasses.fields(_section_type(section)) if f.name == key)
    return str(f.metadata.get("kind", "computed"))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(name: str) -> type:
    return _hints(ExperimentConfig)[name]


def _field_type(section: str, key: str) -> Any:
    return _hints(_section_type(section))[key]


def _build_section(name: str, section_cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(sorted(unknown))} in [{name}]; valid keys: "
            f"{', '.join(sorted(fields))}"
        )
    hints = _hints(section_cls)
    typed = {k: _coerce(f"{name}.{k}", hints[k], v) for k, v in values.items()}
    try:
        return section_cls(**typed)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"[{name}]: {exc}") from exc


def _coerce(where: str, typ: Any, value: Any) -> Any:
    """Coerce a TOML value or an override string to `typ`, or raise a ConfigError naming `where`."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if typ is str:
            return str(value)
        if origin is tuple:
            (inner, _ellipsis) = typing.get_args(typ)
            if isinstance(value, str):
                items: list[Any] = []
                for part in value.strip().strip("[]()").split(","):
                    part = part.strip()
                    repeat = re.fullmatch(r"(\d+)x(\d+)", part)  # "3x1000" = 1000,1000,1000
                    if repeat:
                        items += [repeat.group(2)] * int(repeat.group(1))
                    elif part:
                        items.append(part)
            elif isinstance(value, list | tuple):
                items = list(value)
            else:
                raise ValueError
            return tuple(_coerce(where, inner, v) for v in items)
        if origin in (typing.Union, types.UnionType):
            raise ValueError  # not used by the config tree
    except (ValueError, TypeError):
        pass
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    if typ is float and str(value).strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise ConfigError(f"{where} = {value!r} is not a finite number; give a real value")
    if origin is tuple:
        raise ConfigError(f"{where} = {value!r} is not a valid list of whole numbers; give sizes "
                          "separated by commas, or NxSIZE for N equal ones, e.g. 500,500 or 3x1000")
    raise ConfigError(f"{where} = {value!r} is not a valid {name}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a TOML config file (or defaults), then apply overrides."""
    config = ExperimentConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing --config FILE.toml")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                              f"at offset {exc.start}); TOML files are UTF-8: save it as UTF-8") from None
        config = ExperimentConfig.from_dict(data)
    return config.with_overrides(overrides or [])
