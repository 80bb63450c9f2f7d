"""The experiment's configuration: one flat, typed record.

Every field is settable from a TOML/YAML file and from the command line
(``--user-epochs 2``); the command line wins over the file, the file over the
defaults. Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, check_choice, check_range
from .options import configure
from .paths import user_path
from .specs import AUTO_TARGETS, CONFIG_PRECISIONS, LoRASpec, TrainSpec


@dataclass(frozen=True)
class ExperimentConfig:
    """attack -> victim -> defense -> evaluation.

    ``setting="weight"`` (weight poisoning, the default): stage 1 (attacker) fully
    fine-tunes the student on ``attacker_rows`` poisoned rows; stage 2 (user): each
    defense fine-tunes the released model on ``user_rows`` clean rows (disjoint from
    the attacker's).

    ``setting="data"`` (data poisoning, W2SDefense's main setting): the attacker
    poisons the user's ``user_rows`` training rows and there is no attacker stage;
    each defense fine-tunes the clean base student on them (``none``: plain LoRA
    learns the backdoor). A teacher learns from ``teacher_rows`` trusted clean rows
    disjoint from the user's (the defender's small clean set).

    ``clean_baseline`` adds the clean student (``none`` on the user's clean rows:
    the floor); ``clean_defenses`` applies those defenses to the unpoisoned student
    too (the "clean model" case: a defense should not cost clean accuracy).

    Attributes:
        backend: the training backend (default: $UNBACKDOOR_BACKEND, else torch).
        model: the student: a named model (smollm2-135m, minilm-l6), a local HF directory or a hub id.
        teacher: W2SDefense's small clean teacher, in the same forms (checked only when a defense uses it).
        dataset: a shipped dataset name (sst2, hsol, agnews, offenseval, mr, cr) or a path to one.
        data_dir: where the shipped datasets live (default: ../shared/data or $UNBACKDOOR_DATA_DIR).
        encoding: the text encoding of a user dataset file (default: UTF-8, with a clear error otherwise).
        attack: the attack plugin that poisons the training rows and triggers the test rows.
        attack_options: the attack's options, KEY=VALUE (see ``unbackdoor list --options ATTACK``).
        defenses: the defense plugins to compare, comma-separated.
        defense_options: the defenses' options, NAME.KEY=VALUE (see ``unbackdoor list --options NAME``).
        target: the class the backdoor maps triggered inputs to.
        poison_rate: the share of the attacker's rows (data setting: the user's) that carry the trigger.
        clean_label: poison only rows already of the target class (a clean-label attack).
        seed: seeds data splits, poisoning, initialisation and batch order.
        attacker_rows: training rows the attacker poisons and fully fine-tunes the student on.
        attacker_epochs: the attacker's epochs.
        attacker_lr: the attacker's learning rate.
        attacker_batch_size: the attacker's batch size.
        user_rows: the user's clean training rows (disjoint from the attacker's or the trusted rows).
        user_epochs: the user's (each defense's) fine-tuning epochs.
        user_lr: the user's learning rate (LoRA).
        user_batch_size: the user's batch size.
        lora_rank: the user's LoRA rank r.
        lora_alpha: LoRA's scaling numerator (scaling = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: the layers LoRA adapts, comma-separated; ``auto``: the family's query and value
            projections; ``all-linear``: every linear layer.
        test_rows: clean test rows evaluated (their triggered copies give ASR and PACC).
        max_length: tokens kept per input.
        eval_batch_size: the batch size of evaluation.
        precision: ``fp32``, or ``bf16``: bf16 matmuls (autocast) and, once an adapter freezes the base
            model, its linear and embedding weights held in bf16 (half the memory); adapters, heads, norms,
            optimiser state and full fine-tunes stay fp32. ``auto``: bf16 where the backend's device runs bf16
            matmuls natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX; torch), else fp32; resolved
            before the first stage and recorded as resolved.
        gradient_checkpointing: recompute each layer's activations in the backward pass instead of keeping
            them: less memory for longer steps, the same numbers.
        clean_baseline: also fine-tune the clean student (``none`` on clean rows): the floor.
        clean_defenses: defenses also applied to the unpoisoned student (the "clean model" case).
        out: the run directory (results.json, results.md, plots, run.json for --resume).
        cache_dir: where finished stages are cached (default: ~/.cache/unbackdoor or $UNBACKDOOR_CACHE).
        setting: ``weight`` (a poisoned released model, clean user rows) or ``data`` (poisoned user rows).
        teacher_rows: the data setting's trusted clean rows the teacher learns from.
    """

    backend: str | None = None
    model: str = "smollm2-135m"
    teacher: str = "minilm-l6"
    dataset: str = "sst2"
    data_dir: str | None = None
    encoding: str | None = None
    attack: str = "badnet"
    attack_options: dict[str, Any] = field(default_factory=dict)
    defenses: tuple[str, ...] = ("none", "w2s")
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: int = 1
    poison_rate: float = 0.2
    clean_label: bool = False
    seed: int = 0
    attacker_rows: int = 400
    attacker_epochs: float = 2.0
    attacker_lr: float = 5e-5
    attacker_batch_size: int = 16
    user_rows: int = 200
    user_epochs: float = 2.0
    user_lr: float = 2e-4
    user_batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    #: ``auto``: the model family's attention query and value projections (``q_proj,v_proj`` on Llama,
    #: ``query,value`` on BERT; :data:`~unbackdoor.specs.FAMILY_TARGETS`), made concrete before the run
    lora_targets: tuple[str, ...] = (AUTO_TARGETS,)
    test_rows: int = 200
    max_length: int = 48
    eval_batch_size: int = 64
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    clean_baseline: bool = False
    clean_defenses: tuple[str, ...] = ()
    out: str = "runs/default"
    cache_dir: str | None = None
    setting: str = "weight"
    teacher_rows: int = 400

    def attacker_spec(self) -> TrainSpec:
        """Stage 1: the attacker's full fine-tune."""
        return TrainSpec(self.attacker_epochs, self.attacker_lr, self.attacker_batch_size, self.max_length,
                         seed=self.seed)

    def user_spec(self) -> TrainSpec:
        """Stage 2: the user's (defense's) fine-tune."""
        return TrainSpec(self.user_epochs, self.user_lr, self.user_batch_size, self.max_length,
                         seed=self.seed)

    def lora(self) -> LoRASpec:
        """The user's LoRA adapter."""
        return LoRASpec(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    def validate(self) -> ExperimentConfig:
        """Check every spec derived from this config (raises :class:`ConfigError`)."""
        self._check_types()
        check_choice("precision", self.precision, CONFIG_PRECISIONS)
        check_choice("setting", self.setting, SETTINGS)
        check_range("seed", self.seed, 0, MAX_SEED)
        # `auto` is resolved by the runner once the backend is known; the specs' other fields are checked here
        concrete = dataclasses.replace(self, precision="fp32") if self.precision == "auto" else self
        for stage, make in (("attacker", concrete.attacker_spec), ("user", concrete.user_spec), ("lora", self.lora)):
            try:
                make()
            except ConfigError as exc:
                raise ConfigError(f"{stage} settings ({stage}_*): {exc}") from None
        for name in ("attacker_rows", "user_rows", "test_rows", "teacher_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.defenses:
            raise ConfigError("defenses is empty; name at least one (e.g. none,w2s)")
        return self

    def _check_types(self) -> None:
        """Types that coercion cannot vouch for: optional strings and the option tables (API callers)."""
        for name in OPTIONAL_STRINGS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"config option {name!r} expects a string or nothing, got {value!r}")
        if not isinstance(self.attack_options, dict):
            raise ConfigError(f"config option 'attack_options' expects a table KEY=VALUE, got {self.attack_options!r}")
        for name, options in self.defense_options.items():
            if not isinstance(options, dict):
                raise ConfigError(f"defense_options for {name!r} must be a table of KEY=VALUE, got {options!r} "
                                  f"(e.g. [defense_options.{name}] in TOML)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for results.json and cache keys)."""
        return dataclasses.asdict(self)


#: weight poisoning (a poisoned released model, clean user data) or data poisoning (poisoned user data)
SETTINGS = ("weight", "data")
#: the config's fields by topic, in the order ``unbackdoor run --help`` shows them
FIELD_GROUPS = (
    ("experiment", ("backend", "model", "teacher", "setting", "dataset", "data_dir", "encoding", "attack",
                    "attack_options", "target", "poison_rate", "clean_label", "defenses", "defense_options",
                    "seed")),
    ("attacker (weight setting)", ("attacker_rows", "attacker_epochs", "attacker_lr", "attacker_batch_size")),
    ("user fine-tune", ("user_rows", "user_epochs", "user_lr", "user_batch_size", "teacher_rows")),
    ("LoRA", ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")),
    ("evaluation", ("test_rows", "max_length", "eval_batch_size", "clean_baseline", "clean_defenses")),
    ("compute", ("precision", "gradient_checkpointing")),
    ("output", ("out", "cache_dir")),
)
#: fields whose default is None, so :func:`~unbackdoor.options.configure` does not coerce them
OPTIONAL_STRINGS = ("backend", "data_dir", "encoding", "cache_dir")
#: the largest seed every generator we seed accepts (numpy's legacy RandomState takes 32 bits)
MAX_SEED = 2**32 - 1
#: fields that may be None (no teacher; the default backend, data dir, encoding, cache dir)
NULLABLE = (*OPTIONAL_STRINGS, "teacher")


def field_names() -> list[str]:
    """The valid config keys."""
    return [f.name for f in dataclasses.fields(ExperimentConfig)]


def normalize(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every value coerced and checked as if it came from a file (for API callers).

    ``ExperimentConfig(seed="3")`` becomes ``seed=3``; ``ExperimentConfig(seed="x")`` raises a
    :class:`ConfigError` naming ``seed``. None stays None where a field allows it (:data:`NULLABLE`;
    ``teacher=None``: no teacher), and a ``Path`` is accepted where a path string is expected.
    """
    values = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    nones = {k: None for k in NULLABLE if values[k] is None}
    given = {k: v for k, v in values.items() if k not in nones}
    return dataclasses.replace(configure(ExperimentConfig(), "config", given), **nones).validate()


#: the config files shipped with the package (``--config NAME``), e.g. ``w2s-paper``
PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> dict[str, Path]:
    """The shipped config presets by name (the file name without ``.toml``)."""
    return {f.stem: f for f in sorted(PRESET_DIR.glob("*.toml"))}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, or a shipped preset by name (:func:`presets`);
    ``[experiment]`` tables are flattened. A file of that name wins over a preset."""
    path = user_path("config file", path)
    if not path.is_file() and str(path) in presets():
        path = presets()[str(path)]
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (presets: {', '.join(presets()) or 'none'})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                          f"offset {err.start})") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    elif path.suffix in {".yaml", ".yml"}:
        data = _yaml(path, text)
    else:
        raise ConfigError(f"config file {str(path)!r} must end in .toml, .yaml or .yml")
    table = data.get("experiment", data) if isinstance(data, dict) else data
    if not isinstance(table, dict):
        where = "its [experiment] table" if isinstance(data, dict) else "it"
        raise ConfigError(f"config file {str(path)!r} must hold a table of options, but {where} is a "
                          f"{type(table).__name__}: {_short(table)}")
    return dict(table)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _yaml(path: Path, text: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"reading {str(path)!r} needs PyYAML: pip install 'unbackdoor[yaml]'") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None


def build_config(*layers: dict[str, Any]) -> ExperimentConfig:
    """Apply option layers in order (later wins) to the defaults; values are coerced and checked.

    The option tables merge key by key (``defense_options`` defense by defense): a flag
    ``--defense-option w2s.teacher_epochs=1`` on top of a file's ``[defense_options.w2s]`` keeps the file's
    other w2s options.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if value is None:
                continue
            if key in OPTION_TABLES and isinstance(value, dict) and isinstance(merged.get(key), dict):
                value = _merged_table(merged[key], value, nested=key == "defense_options")
            merged[key] = value
    return configure(ExperimentConfig(), "config", merged).validate()


#: the config fields that are tables of options (merged key by key across layers)
OPTION_TABLES = ("attack_options", "defense_options")


def _merged_table(base: dict[str, Any], top: dict[str, Any], nested: bool) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both = nested and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out
