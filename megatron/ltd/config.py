"""random-LTD flags and DeepSpeed JSON -> one validated ``RandomLTDConfig``.

Units: ``--random-ltd-start`` / ``--random-ltd-step`` / ``--random-ltd-layer-starts`` are kept
sequence lengths in tokens per sample; ``--random-ltd-schedule-steps`` is in optimizer
iterations (DeepSpeed ``require_steps``); ``--random-ltd-schedule-tokens`` in raw consumed data
tokens (``samples * seq_length``, dropped tokens included; see ``megatron.ltd.schedule``);
``--train-layer-tokens``, ``--lr-warmup-layer-tokens`` and ``--lr-decay-layer-tokens`` in layer
tokens (tokens summed over layers, see ``megatron.ltd.layer_tokens``).

Sources. Flags, and with ``--deepspeed-config``/``--deepspeed_config`` a DeepSpeed JSON whose
``data_efficiency.data_routing.random_ltd`` section is read as DeepSpeed reads it (so
Megatron-DeepSpeed configs work unchanged). The section is active when ``data_efficiency.enabled``,
``data_routing.enabled`` and ``random_ltd.enabled`` are all true (DeepSpeed's defaults are false);
an inactive section is ignored (Megatron-DeepSpeed's baseline configs carry placeholder values).
A value given both as a flag and in the JSON must agree, or a ``UserError`` names both.

JSON keys (path ``data_efficiency.data_routing.random_ltd``) and their flags:
``total_layer_num`` = ``--num-layers``; ``random_ltd_layer_id`` = ``--random-ltd-layer-ids``;
``random_ltd_layer_num`` = number of ids; ``random_ltd_schedule.min_value`` =
``--random-ltd-start``; ``.max_value`` = ``--seq-length``; ``.schedule_type`` =
``--random-ltd-schedule``; ``.schedule_config.require_steps`` = ``--random-ltd-schedule-steps``;
``.schedule_config.seq_per_step`` = ``--random-ltd-step``; extensions (not in DeepSpeed)
``.schedule_config.require_tokens`` = ``--random-ltd-schedule-tokens`` and
``.schedule_config.root_degree`` = ``--random-ltd-root-degree``;
``layer_token_lr_schedule.enabled`` = ``--layer-token-lr``, ``.warmup_layer_tokens`` =
``--lr-warmup-layer-tokens``, ``.total_layer_tokens`` = ``--lr-decay-layer-tokens``;
``model_type``, ``hidden_state_order``, ``model_mask_name`` are JSON-only.

The shipped examples (``examples/deepspeed_configs``) follow Megatron-DeepSpeed's data-efficiency
recipes: GPT-3 1.3B (24 layers, GBS 512, seq 2048, start 128, +16, 200,000 steps = 210B raw
tokens), GPT-3 350M (GBS 256: the same 210B tokens = 400,000 steps) and BERT-large (seq 512,
GBS 1024, 2M steps, encoder).
"""

import copy
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron.errors import UserError
from megatron.ltd.schedule import SCHEDULE_TYPES, linear_layer_starts

METHODS = ("random", "tokenbypass", "sctd")
MODEL_TYPES = ("decoder", "encoder")
HIDDEN_STATE_ORDERS = ("seq_batch_dim", "batch_seq_dim")
DS_PATH = "data_efficiency.data_routing.random_ltd"
DEFAULT_STEP = 16
DEFAULT_ROOT_DEGREE = 2.0  # fixed_root without a degree: square-root growth


@dataclass(frozen=True)
class RandomLTDConfig:
    """Validated random-LTD and layer-token settings (see the module docstring for units)."""

    enabled: bool
    """Tokens are dropped (False: only the layer-token budget/LR options are in use)."""
    method: str
    """'random' (random-LTD), 'tokenbypass' (Hou et al. 2022) or 'sctd' (Zhong et al. 2023:
    TokenBypass dropping plus a periodic full-sequence pass; ``megatron.ltd.sctd``)."""
    num_layers: int
    """Total transformer layers (--num-layers; DeepSpeed total_layer_num)."""
    seq_length: int
    """Full sequence length (--seq-length; DeepSpeed max_value)."""
    layer_ids: Tuple[int, ...]
    """Dropping layers, 0-based, ascending (default 1..L-2)."""
    schedule: str
    """Kept-length schedule: fixed_linear, fixed_root or constant."""
    start: int
    """Kept length at the start (DeepSpeed min_value; the smallest per-layer start)."""
    step: int
    """Kept lengths are rounded down to a multiple of this (DeepSpeed seq_per_step)."""
    schedule_steps: Optional[int]
    """Iterations from start to full length (DeepSpeed require_steps), or None."""
    schedule_tokens: Optional[int]
    """Raw consumed tokens from start to full length (token-based schedule), or None."""
    root_degree: float
    """Root degree of fixed_root (1.0 for fixed_linear)."""
    layer_starts: Optional[Tuple[int, ...]]
    """Per-layer starts, one per layer id, or None (all layers start at ``start``)."""
    keep_special_tokens: bool
    """Ablation: always keep special tokens ([CLS]/[SEP]/first token) in dropping layers."""
    real_tokens_only: bool
    """Kept slots are drawn among real tokens only: padding is kept only when a sample has
    fewer real tokens than the kept length (--random-ltd-real-tokens-only; not in DeepSpeed)."""
    model_type: Optional[str]
    """'decoder' (GPT) or 'encoder' (BERT) from the JSON; None: from the model."""
    hidden_state_order: str
    """DeepSpeed hidden_state_order (seq_batch_dim is Megatron's [s, b, h])."""
    model_mask_name: Optional[str]
    """DeepSpeed model_mask_name (informational)."""
    train_layer_tokens: Optional[int]
    """Stop once this many layer tokens have been consumed (budget), or None."""
    layer_token_lr: bool
    """Drive LR warmup/decay by consumed layer tokens (paper Appendix C)."""
    lr_warmup_layer_tokens: Optional[int]
    """LayerToken LR warmup in layer tokens (None: derived from the iteration warmup)."""
    lr_decay_layer_tokens: Optional[int]
    """LayerToken LR decay horizon in layer tokens (None: the run's total layer tokens)."""
    deepspeed_config: Optional[str]
    """Path of the DeepSpeed JSON read, if any."""
    sctd_interval: int = 10
    """SCTD: every this many iterations a step runs the full-sequence pass too (--sctd-interval)."""
    sctd_kl_weight: float = 0.05
    """SCTD: lambda, the weight of KL_last + KL_penultimate on dual steps (--sctd-kl-weight)."""
    sctd_mlm_weight: float = 0.5
    """SCTD: the weight of each pass's MLM (and SOP) loss on dual steps (--sctd-mlm-weight)."""

    def deepspeed_section(self) -> dict:
        """This config as DeepSpeed's ``data_efficiency.data_routing.random_ltd`` dict."""
        sched_cfg = {"seq_per_step": self.step}
        if self.schedule_steps is not None:
            sched_cfg["require_steps"] = self.schedule_steps
        if self.schedule_tokens is not None:
            sched_cfg["require_tokens"] = self.schedule_tokens
        if self.schedule == "fixed_root":
            sched_cfg["root_degree"] = self.root_degree
        out = {
            "enabled": self.enabled,
            "total_layer_num": self.num_layers,
            "random_ltd_layer_num": len(self.layer_ids),
            "random_ltd_layer_id": list(self.layer_ids),
            "model_mask_name": self.model_mask_name,
            "model_type": self.model_type,
            "hidden_state_order": self.hidden_state_order,
            "random_ltd_schedule": {"min_value": self.start, "max_value": self.seq_length,
                                    "schedule_type": self.schedule,
                                    "schedule_config": sched_cfg},
            "layer_token_lr_schedule": {"enabled": self.layer_token_lr},
        }
        if self.lr_warmup_layer_tokens is not None:
            out["layer_token_lr_schedule"]["warmup_layer_tokens"] = self.lr_warmup_layer_tokens
        if self.lr_decay_layer_tokens is not None:
            out["layer_token_lr_schedule"]["total_layer_tokens"] = self.lr_decay_layer_tokens
        return out


# ----------------------------------------------------------------------------------------------
# flags


@dataclass(frozen=True)
class Preset:
    """A published random-LTD kept-length schedule, scaled to any run length: the kept length
    starts at ``start`` and grows by 16 every ``tokens_per_step`` tokens of the paper's run of
    ``paper_tokens`` tokens; here it reaches the full length after the same fraction of the run
    (``ramp_fraction``), so a shorter run follows the same shape."""

    start: int
    tokens_per_step: float
    paper_tokens: float
    seq_length: int
    note: str

    @property
    def ramp_fraction(self) -> float:
        steps = (self.seq_length - self.start) / DEFAULT_STEP
        return min(1.0, steps * self.tokens_per_step / self.paper_tokens)


_BERT_2M = 2_000_000 * 1024 * 512  # tokens of the paper's BERT-large run (2M iterations)
_BERT_200K = 200_000 * 1024 * 512  # the 0.2M-iteration ablations
#: Yao et al. 2022, BERT-large on the PILE (seq 512, batch 1024): Tab. 2/E.1 and the ablations.
PRESETS = {
    "bert-ltd-1": Preset(200, 48e9, _BERT_2M, 512, "random-LTD-1: start 200, +16 per 48B tokens"),
    "bert-ltd-2": Preset(128, 38e9, _BERT_2M, 512, "random-LTD-2: start 128, +16 per 38B tokens"),
    "bert-ablation-3.8b": Preset(256, 3.8e9, _BERT_200K, 512,
                                 "0.2M-iteration ablation: start 256, +16 per 3.8B tokens"),
    "bert-ablation-6b": Preset(256, 6e9, _BERT_200K, 512,
                               "0.2M-iteration ablation: start 256, +16 per 6B tokens"),
}


def apply_random_ltd_preset(args):
    """Expand ``--random-ltd-preset NAME`` into the flags it stands for: --random-ltd,
    --random-ltd-start, --random-ltd-step 16, a fixed_linear schedule over the preset's
    fraction of this run (--random-ltd-schedule-steps from --train-iters/--train-samples, or
    --random-ltd-schedule-tokens from --train-tokens). The start scales with --seq-length when
    it is not the paper's 512. Flags the preset sets may not also be given."""
    name = getattr(args, "random_ltd_preset", None)
    if name is None:
        return None
    preset = PRESETS[name]
    for flag in ("random_ltd_start", "random_ltd_step", "random_ltd_schedule",
                 "random_ltd_schedule_steps", "random_ltd_schedule_tokens",
                 "random_ltd_layer_starts", "deepspeed_config"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--random-ltd-preset {name} sets the schedule: leave out "
                            f"--{flag.replace('_', '-')}")
    if getattr(args, "random_ltd_method", "random") not in (None, "random"):
        raise UserError(f"--random-ltd-preset {name} is random-LTD: leave out "
                        f"--random-ltd-method {args.random_ltd_method}")
    seq = args.seq_length
    start = preset.start if seq == preset.seq_length else \
        max(DEFAULT_STEP, round(preset.start * seq / preset.seq_length / DEFAULT_STEP)
            * DEFAULT_STEP)
    args.random_ltd = True
    args.random_ltd_start = min(start, seq)
    args.random_ltd_step = DEFAULT_STEP
    args.random_ltd_schedule = "fixed_linear"
    fraction = preset.ramp_fraction
    if args.train_iters is not None:
        args.random_ltd_schedule_steps = max(1, round(fraction * args.train_iters))
    elif args.train_samples is not None:
        args.random_ltd_schedule_steps = max(
            1, round(fraction * args.train_samples / args.global_batch_size))
    elif args.train_tokens is not None:
        args.random_ltd_schedule_tokens = max(1, round(fraction * args.train_tokens))
    else:
        raise UserError(f"--random-ltd-preset {name} scales to the run length: give "
                        "--train-iters, --train-samples or --train-tokens")
    return preset


def check_model_type(args, expected: str, entry: str) -> None:
    """A DeepSpeed JSON's ``model_type`` ('decoder' GPT, 'encoder' BERT) must fit the entry
    point (DeepSpeed would build the other kind of mask)."""
    cfg = random_ltd_config_from_args(args)
    if cfg is not None and cfg.model_type is not None and cfg.model_type != expected:
        raise UserError(f"--deepspeed-config {cfg.deepspeed_config}: {DS_PATH}.model_type is "
                        f"{cfg.model_type!r} but {entry} trains an {expected} "
                        f"({'BERT' if expected == 'encoder' else 'GPT'}) model")


def add_random_ltd_args(parser):
    """Add the random-LTD, layer-token and DeepSpeed-config flags to ``parser``; returns it."""
    g = parser.add_argument_group("random-LTD")
    g.add_argument("--random-ltd", action="store_true",
                   help="Enable random layerwise token dropping in the middle layers.")
    g.add_argument("--random-ltd-method", default="random", choices=list(METHODS),
                   help="Which tokens the dropping layers skip.")
    g.add_argument("--random-ltd-start", type=int, default=None,
                   help="Kept tokens per sample at the start (DeepSpeed min_value).")
    g.add_argument("--random-ltd-step", type=int, default=None,
                   help=f"Kept length granularity (DeepSpeed seq_per_step; default "
                        f"{DEFAULT_STEP}).")
    g.add_argument("--random-ltd-schedule-steps", type=int, default=None,
                   help="Iterations to grow from the start to --seq-length (require_steps).")
    g.add_argument("--random-ltd-schedule-tokens", type=int, default=None,
                   help="Raw consumed tokens (samples x seq length) to grow to --seq-length.")
    g.add_argument("--random-ltd-layer-ids", type=int, nargs="+", default=None,
                   help="0-based dropping layers (default 1 .. num_layers-2).")
    g.add_argument("--random-ltd-allow-edge-layers", action="store_true",
                   help="Ablation only (Yao et al. 2022, Tab. 5): let --random-ltd-layer-ids "
                        "name the first and/or last layer. Off by default: random-LTD keeps "
                        "them at full length, which the paper finds matters for quality.")
    g.add_argument("--random-ltd-schedule", default=None, choices=list(SCHEDULE_TYPES),
                   help="Kept-length schedule (default fixed_linear).")
    g.add_argument("--random-ltd-root-degree", type=float, default=None,
                   help=f"Root degree of fixed_root (default {DEFAULT_ROOT_DEGREE}).")
    g.add_argument("--random-ltd-layer-starts", type=int, nargs="+", default=None,
                   help="Per-layer starts: one per dropping layer, or FIRST LAST (linearly "
                        "spaced over the dropping layers).")
    g.add_argument("--random-ltd-preset", default=None, choices=list(PRESETS),
                   help="A published schedule (Yao et al. 2022, BERT-large), scaled to this "
                        "run's length; implies --random-ltd.")
    g.add_argument("--random-ltd-real-tokens-only", action="store_true",
                   help="Draw the kept tokens among real (non-padding) tokens only (BERT).")
    g.add_argument("--random-ltd-keep-special-tokens", action="store_true",
                   help="Ablation: dropping layers always keep the special tokens.")
    g.add_argument("--sctd-interval", type=int, default=None,
                   help="SCTD: run the full-sequence pass too every this many iterations "
                        "(default 10, Zhong et al. 2023).")
    g.add_argument("--sctd-kl-weight", type=float, default=None,
                   help="SCTD: lambda, the weight of the two [CLS] KL terms (default 0.05).")
    g.add_argument("--sctd-mlm-weight", type=float, default=None,
                   help="SCTD: the weight of each pass's MLM/SOP loss on dual steps "
                        "(default 0.5).")
    g.add_argument("--train-layer-tokens", type=int, default=None,
                   help="Stop after this many layer tokens (tokens summed over layers).")
    g.add_argument("--layer-token-lr", action="store_true",
                   help="LR warmup and decay measured in layer tokens (LayerToken LR).")
    g.add_argument("--lr-warmup-layer-tokens", type=int, default=None,
                   help="LayerToken LR warmup in layer tokens (default: from the iteration "
                        "warmup).")
    g.add_argument("--lr-decay-layer-tokens", type=int, default=None,
                   help="LayerToken LR decay horizon in layer tokens (default: the run's "
                        "total).")
    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config",
                   default=None, help="DeepSpeed JSON; its data_efficiency.data_routing."
                                      "random_ltd section configures random-LTD.")
    return parser


# ----------------------------------------------------------------------------------------------
# DeepSpeed JSON


def load_deepspeed_config(path) -> dict:
    """Read a DeepSpeed JSON (a dict passes through); UserError naming the file otherwise."""
    if isinstance(path, dict):
        return path
    if not os.path.isfile(path):
        raise UserError(f"--deepspeed-config {path}: no such file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed-config {path}: not valid JSON (line {err.lineno} column "
                        f"{err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--deepspeed-config {path}: cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"--deepspeed-config {path}: expected a JSON object at the top level")
    return data


PRE_RELEASE_KEYS = {"randomltd_layer_num": "random_ltd_layer_num",
                    "randomltd_layer_id": "random_ltd_layer_id",
                    "randomltd_schedule": "random_ltd_schedule"}


def released_layout(data: dict, where) -> dict:
    """A JSON in DeepSpeed's 2022 pre-release layout (``dynamic_train.random_ltd`` with
    ``randomltd_*`` keys, as Megatron-DeepSpeed's examples/random_ltd configs) rewritten to the
    released one (``data_efficiency.data_routing.random_ltd``, ``random_ltd_*`` keys), so both
    configure the same run. Its ``micro_batch_size`` (the template's fixed 4, whatever the run's
    micro-batch) is informational; ``saving_layer_tokens`` other than -1 (off) is refused."""
    old = data.get("dynamic_train", {}).get("random_ltd") \
        if isinstance(data.get("dynamic_train"), dict) else None
    if not isinstance(old, dict) or "data_efficiency" in data:
        return data
    old = copy.deepcopy(old)  # (the caller's dict stays as given)
    section = {PRE_RELEASE_KEYS.get(k, k): v for k, v in old.items() if k != "micro_batch_size"}
    sched_cfg = section.get("random_ltd_schedule", {}).get("schedule_config", {})
    saving = sched_cfg.pop("saving_layer_tokens", -1) if isinstance(sched_cfg, dict) else -1
    if saving != -1:
        raise UserError(f"--deepspeed-config {where}: dynamic_train.random_ltd.randomltd_schedule"
                        f".schedule_config.saving_layer_tokens = {saving!r} is not supported "
                        "(only -1, off)")
    enabled = old.get("enabled", False)
    return {**data, "data_efficiency": {"enabled": enabled, "data_routing": {
        "enabled": enabled, "random_ltd": section}}}


class _Json:
    """Typed access to the JSON with errors naming the file and the key path."""

    def __init__(self, data, where):
        self.data, self.where = data, where

    def err(self, path, what):
        return UserError(f"--deepspeed-config {self.where}: {path} {what}")

    def node(self, path):
        cur = self.data
        for key in path.split("."):
            if not isinstance(cur, dict):
                raise self.err(path, "is inside a value that is not a JSON object")
            if key not in cur:
                return None
            cur = cur[key]
        return cur

    def get(self, path, kind):
        value = self.node(path)
        if value is None:
            return None
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind == "dict":
            ok = isinstance(value, dict)
        else:  # list of int
            ok = isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            expected = {"ints": "a list of integers", "dict": "an object"}.get(kind, f"a {kind}")
            raise self.err(path, f"must be {expected}, got {value!r}")
        return value


def _merge(flag, flag_value, js, path, json_value):
    """The value given by either source; a disagreement is a UserError naming both."""
    if flag_value is not None and json_value is not None:
        a = list(flag_value) if isinstance(flag_value, (list, tuple)) else flag_value
        b = list(json_value) if isinstance(json_value, (list, tuple)) else json_value
        if a != b:
            shown = " ".join(map(str, a)) if isinstance(a, list) else a
            raise UserError(f"{flag} {shown} contradicts --deepspeed-config {js.where}: "
                            f"{path} = {json_value!r}")
    return flag_value if flag_value is not None else json_value


# ----------------------------------------------------------------------------------------------
# args -> config


def _sctd_settings(g) -> dict:
    """--sctd-interval / --sctd-kl-weight / --sctd-mlm-weight (published defaults where not
    given); giving one without --random-ltd-method sctd is a UserError naming it."""
    given = {"interval": g("sctd_interval"), "kl-weight": g("sctd_kl_weight"),
             "mlm-weight": g("sctd_mlm_weight")}
    if (g("random_ltd_method") or "random") != "sctd":
        for name, value in given.items():
            if value is not None:
                raise UserError(f"--sctd-{name} needs --random-ltd --random-ltd-method sctd")
    interval = 10 if given["interval"] is None else given["interval"]
    kl_weight = 0.05 if given["kl-weight"] is None else given["kl-weight"]
    mlm_weight = 0.5 if given["mlm-weight"] is None else given["mlm-weight"]
    if interval < 1:
        raise UserError(f"--sctd-interval must be at least 1, got {interval}")
    if kl_weight < 0 or mlm_weight < 0:
        raise UserError(f"--sctd-kl-weight ({kl_weight}) and --sctd-mlm-weight ({mlm_weight}) "
                        f"must not be negative")
    return dict(sctd_interval=int(interval), sctd_kl_weight=float(kl_weight),
                sctd_mlm_weight=float(mlm_weight))


def sctd_settings_from_args(args) -> dict:
    """{sctd_interval, sctd_kl_weight, sctd_mlm_weight} from the flags (defaults filled in)."""
    return _sctd_settings(lambda name, default=None: getattr(args, name, default))


def random_ltd_config_from_args(args) -> Optional[RandomLTDConfig]:
    """Validated config from the flags (and the DeepSpeed JSON), or None when neither random-LTD
    nor any layer-token option is asked for. With only layer-token options (a baseline keyed on
    layer tokens) the config has ``enabled=False`` and nothing drops."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    ds_source = g("deepspeed_config")
    js = _Json({}, None)
    section_on = None  # None: no random_ltd section in the JSON
    if ds_source is not None:
        where = "<dict>" if isinstance(ds_source, dict) else ds_source
        js = _Json(released_layout(load_deepspeed_config(ds_source), where), where)
        # DeepSpeed's train_batch_size is the global batch; our flags decide the batch, so a
        # JSON that says otherwise would be silently overruled.
        _merge("--global-batch-size", g("global_batch_size"), js, "train_batch_size",
               js.get("train_batch_size", "int"))
        if js.node(DS_PATH) is not None:
            js.get(DS_PATH, "dict")
            switches = ("data_efficiency.enabled", "data_efficiency.data_routing.enabled",
                        DS_PATH + ".enabled")
            states = {p: bool(js.get(p, "bool")) for p in switches}
            section_on = all(states.values())
            if g("random_ltd") and not section_on:
                off = next(p for p, v in states.items() if not v)
                raise UserError(f"--random-ltd contradicts --deepspeed-config {where}: {off} is "
                                f"false or missing (DeepSpeed then disables random-LTD)")
    enabled = bool(g("random_ltd")) or bool(section_on)
    # Values from an inactive section are placeholders: do not read them.
    P = DS_PATH if section_on else None
    jget = (lambda sub, kind: js.get(f"{P}.{sub}", kind)) if P else (lambda sub, kind: None)
    jpath = lambda sub: f"{DS_PATH}.{sub}"  # noqa: E731

    lt_lr_json = jget("layer_token_lr_schedule.enabled", "bool")
    layer_token_lr = bool(_merge("--layer-token-lr", True if g("layer_token_lr") else None,
                                 js, jpath("layer_token_lr_schedule.enabled"), lt_lr_json))
    lr_warmup_lt = _merge("--lr-warmup-layer-tokens", g("lr_warmup_layer_tokens"), js,
                          jpath("layer_token_lr_schedule.warmup_layer_tokens"),
                          jget("layer_token_lr_schedule.warmup_layer_tokens", "int"))
    lr_decay_lt = _merge("--lr-decay-layer-tokens", g("lr_decay_layer_tokens"), js,
                         jpath("layer_token_lr_schedule.total_layer_tokens"),
                         jget("layer_token_lr_schedule.total_layer_tokens", "int"))
    train_lt = g("train_layer_tokens")
    if not enabled:
        # Dropping options without dropping: say so rather than train dense silently.
        if (g("random_ltd_method") or "random") != "random":
            raise UserError(f"--random-ltd-method {g('random_ltd_method')} needs --random-ltd")
        if g("random_ltd_keep_special_tokens"):
            raise UserError("--random-ltd-keep-special-tokens needs --random-ltd")
        if g("random_ltd_real_tokens_only"):
            raise UserError("--random-ltd-real-tokens-only needs --random-ltd")
        if g("random_ltd_allow_edge_layers"):
            raise UserError("--random-ltd-allow-edge-layers needs --random-ltd")
    if not enabled and not (layer_token_lr or train_lt is not None or lr_warmup_lt is not None
                            or lr_decay_lt is not None):
        for flag in ("random_ltd_start", "random_ltd_step", "random_ltd_schedule_steps",
                     "random_ltd_schedule_tokens", "random_ltd_layer_ids", "random_ltd_schedule",
                     "random_ltd_root_degree", "random_ltd_layer_starts"):
            if g(flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs --random-ltd")
        _sctd_settings(g)  # --sctd-* flags without SCTD: one line
        return None

    for value, flag in ((lr_warmup_lt, "--lr-warmup-layer-tokens"),
                        (lr_decay_lt, "--lr-decay-layer-tokens")):
        if value is not None and not layer_token_lr:
            raise UserError(f"{flag} needs --layer-token-lr")
    if lr_warmup_lt is not None and lr_warmup_lt < 0:
        raise UserError(f"--lr-warmup-layer-tokens must be >= 0, got {lr_warmup_lt}")
    if lr_decay_lt is not None and lr_decay_lt <= 0:
        raise UserError(f"--lr-decay-layer-tokens must be positive, got {lr_decay_lt}")
    if (lr_warmup_lt is not None and lr_decay_lt is not None and lr_warmup_lt >= lr_decay_lt):
        raise UserError(f"--lr-warmup-layer-tokens {lr_warmup_lt} must be smaller than "
                        f"--lr-decay-layer-tokens {lr_decay_lt}")
    if train_lt is not None and train_lt <= 0:
        raise UserError(f"--train-layer-tokens must be positive, got {train_lt}")

    num_layers, seq_length = g("num_layers"), g("seq_length")
    if num_layers is None or num_layers <= 0:
        raise UserError("--num-layers is required (and positive) for random-LTD/layer tokens")
    if seq_length is None or seq_length <= 0:
        raise UserError("--seq-length is required (and positive) for random-LTD/layer tokens")

    common = dict(
        **_sctd_settings(g),
        method=g("random_ltd_method", "random") or "random", num_layers=num_layers,
        seq_length=seq_length, keep_special_tokens=bool(g("random_ltd_keep_special_tokens")),
        real_tokens_only=bool(g("random_ltd_real_tokens_only")),
        train_layer_tokens=train_lt, layer_token_lr=layer_token_lr,
        lr_warmup_layer_tokens=lr_warmup_lt, lr_decay_layer_tokens=lr_decay_lt,
        deepspeed_config=js.where)
    if not enabled:
        return RandomLTDConfig(
            enabled=False, layer_ids=(), schedule="constant", start=seq_length,
            step=DEFAULT_STEP, schedule_steps=None, schedule_tokens=None, root_degree=1.0,
            layer_starts=None, model_type=None, hidden_state_order="seq_batch_dim",
            model_mask_name=None, **common)
    if common["method"] not in METHODS:
        raise UserError(f"--random-ltd-method must be one of {', '.join(METHODS)}, "
                        f"got {common['method']!r}")
    # -- model shape
    total = jget("total_layer_num", "int")
    if total is not None and total != num_layers:
        raise UserError(f"--num-layers {num_layers} contradicts --deepspeed-config {js.where}: "
                        f"{jpath('total_layer_num')} = {total}")
    max_value = jget("random_ltd_schedule.max_value", "int")
    if max_value is not None and max_value != seq_length:
        raise UserError(f"--seq-length {seq_length} contradicts --deepspeed-config {js.where}: "
                        f"{jpath('random_ltd_schedule.max_value')} = {max_value}")

    # -- layers
    ids = _merge("--random-ltd-layer-ids", g("random_ltd_layer_ids"), js,
                 jpath("random_ltd_layer_id"), jget("random_ltd_layer_id", "ints"))
    ids_flag = ("--random-ltd-layer-ids" if g("random_ltd_layer_ids") is not None
                else jpath("random_ltd_layer_id"))
    if ids is None:
        if num_layers < 3:
            raise UserError(f"--random-ltd needs --num-layers >= 3 (the first and the last "
                            f"layer never drop), got {num_layers}")
        ids = list(range(1, num_layers - 1))
        ids_flag = "--random-ltd-layer-ids (default 1..L-2)"
    ids = [int(i) for i in ids]
    if not ids:
        raise UserError(f"{ids_flag}: at least one dropping layer is needed")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"{ids_flag}: layer ids {bad} out of range [0, {num_layers - 1}] "
                        f"(--num-layers {num_layers})")
    if len(set(ids)) != len(ids):
        raise UserError(f"{ids_flag}: duplicate layer ids in {ids}")
    edge = [i for i in ids if i in (0, num_layers - 1)]
    if edge and not g("random_ltd_allow_edge_layers"):
        # The first and last layers see the full sequence in random-LTD (the paper's Tab. 5:
        # dropping there too costs quality); only the ablation flag lifts this.
        raise UserError(f"{ids_flag}: layer(s) {edge} are the first/last layer, which never "
                        f"drop tokens (random-LTD keeps them at full length; "
                        f"--random-ltd-allow-edge-layers lifts this for the ablation)")
    ids = sorted(ids)
    n_json = jget("random_ltd_layer_num", "int")
    if n_json is not None and n_json != len(ids):
        raise UserError(f"--deepspeed-config {js.where}: {jpath('random_ltd_layer_num')} = "
                        f"{n_json} but {ids_flag} lists {len(ids)} layers")

    # -- schedule (TokenBypass defaults: a constant half of the sequence, as Hou et al.)
    tokenbypass = g("random_ltd_method") in ("tokenbypass", "sctd")  # SCTD drops as TokenBypass
    schedule = _merge("--random-ltd-schedule", g("random_ltd_schedule"), js,
                      jpath("random_ltd_schedule.schedule_type"),
                      jget("random_ltd_schedule.schedule_type", "str")) or \
        ("constant" if tokenbypass else "fixed_linear")
    if schedule not in SCHEDULE_TYPES:
        raise UserError(f"--deepspeed-config {js.where}: "
                        f"{jpath('random_ltd_schedule.schedule_type')} = {schedule!r} is not one "
                        f"of {', '.join(SCHEDULE_TYPES)}")
    sc = "random_ltd_schedule.schedule_config."
    step = _merge("--random-ltd-step", g("random_ltd_step"), js, jpath(sc + "seq_per_step"),
                  jget(sc + "seq_per_step", "int"))
    step = DEFAULT_STEP if step is None else step
    steps = _merge("--random-ltd-schedule-steps", g("random_ltd_schedule_steps"), js,
                   jpath(sc + "require_steps"), jget(sc + "require_steps", "int"))
    tokens = _merge("--random-ltd-schedule-tokens", g("random_ltd_schedule_tokens"), js,
                    jpath(sc + "require_tokens"), jget(sc + "require_tokens", "int"))
    degree = _merge("--random-ltd-root-degree", g("random_ltd_root_degree"), js,
                    jpath(sc + "root_degree"), jget(sc + "root_degree", "number"))
    start = _merge("--random-ltd-start", g("random_ltd_start"), js,
                   jpath("random_ltd_schedule.min_value"),
                   jget("random_ltd_schedule.min_value", "int"))
    start_flag = ("--random-ltd-start" if g("random_ltd_start") is not None
                  else jpath("random_ltd_schedule.min_value"))

    if not 0 < step <= seq_length:
        raise UserError(f"--random-ltd-step (seq_per_step) must be in [1, --seq-length "
                        f"{seq_length}], got {step}")
    if schedule == "constant":
        steps = tokens = None  # a constant kept length has no horizon
        degree = 1.0
    else:
        if steps is None and tokens is None:
            raise UserError(f"--random-ltd-schedule {schedule} needs --random-ltd-schedule-steps "
                            f"(DeepSpeed {jpath(sc + 'require_steps')}) or "
                            f"--random-ltd-schedule-tokens")
        if steps is not None and tokens is not None:
            raise UserError("--random-ltd-schedule-steps and --random-ltd-schedule-tokens are "
                            "mutually exclusive")
        horizon, hflag = ((steps, "--random-ltd-schedule-steps") if steps is not None
                          else (tokens, "--random-ltd-schedule-tokens"))
        if horizon <= 0:
            raise UserError(f"{hflag} must be positive, got {horizon}")
        if schedule == "fixed_linear":
            if degree is not None and degree != 1:
                raise UserError(f"--random-ltd-root-degree {degree} needs --random-ltd-schedule "
                                f"fixed_root (fixed_linear has degree 1)")
            degree = 1.0
        else:
            degree = DEFAULT_ROOT_DEGREE if degree is None else float(degree)
            if not degree > 0:
                raise UserError(f"--random-ltd-root-degree must be positive, got {degree}")

    starts = g("random_ltd_layer_starts")
    if starts is not None:
        if len(starts) == len(ids):
            starts = [int(v) for v in starts]
        elif len(starts) == 2:
            starts = linear_layer_starts(starts[0], starts[1], len(ids))
        else:
            raise UserError(f"--random-ltd-layer-starts: give one start per dropping layer "
                            f"({len(ids)}) or FIRST LAST, got {len(starts)} values")
        if start is not None and start != min(starts):
            raise UserError(f"{start_flag} {start} must equal the smallest of "
                            f"--random-ltd-layer-starts ({min(starts)})")
        start, start_flag = min(starts), "--random-ltd-layer-starts"
    if start is None and tokenbypass:
        start = seq_length // 2
    if start is None:
        raise UserError(f"--random-ltd needs --random-ltd-start (the kept length at the start; "
                        f"DeepSpeed {jpath('random_ltd_schedule.min_value')})")
    for value in (starts or [start]):
        if not 0 < value <= seq_length:
            raise UserError(f"{start_flag}: kept length {value} must be in [1, --seq-length "
                            f"{seq_length}]")
        if schedule != "constant" and value < step:
            raise UserError(f"{start_flag} {value} is smaller than --random-ltd-step {step}: the "
                            f"first kept length would round down to 0")

    tp = g("tensor_model_parallel_size") or 1
    if g("sequence_parallel") and tp > 1:
        # The sequence-parallel block splits the r kept tokens over the TP ranks. fixed_linear/
        # fixed_root kept lengths are multiples of the step (below full length), constant ones
        # are the starts: check here rather than fail at the first bad step mid-run.
        bad = ([v for v in (starts or [start]) if v < seq_length and v % tp]
               if schedule == "constant" else ([step] if step % tp else []))
        if bad:
            what = (f"kept length(s) {bad} ({start_flag})" if schedule == "constant"
                    else f"--random-ltd-step (seq_per_step) {step}")
            raise UserError(f"random-LTD with --sequence-parallel: {what} must be a multiple "
                            f"of --tensor-model-parallel-size {tp} (each rank takes r/tp of "
                            f"the kept tokens)")

    model_type = jget("model_type", "str")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise UserError(f"--deepspeed-config {js.where}: {jpath('model_type')} = {model_type!r} "
                        f"is not one of {', '.join(MODEL_TYPES)}")
    order = jget("hidden_state_order", "str") or "seq_batch_dim"
    if order not in HIDDEN_STATE_ORDERS:
        raise UserError(f"--deepspeed-config {js.where}: {jpath('hidden_state_order')} = "
                        f"{order!r} is not one of {', '.join(HIDDEN_STATE_ORDERS)}")
    mask_name = jget("model_mask_name", "str")

    return RandomLTDConfig(
        enabled=True, layer_ids=tuple(ids), schedule=schedule, start=int(start), step=int(step),
        schedule_steps=steps, schedule_tokens=tokens, root_degree=float(degree),
        layer_starts=tuple(starts) if starts is not None else None, model_type=model_type,
        hidden_state_order=order, model_mask_name=mask_name, **common)
