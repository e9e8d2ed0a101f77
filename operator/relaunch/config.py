"""Read and rewrite a MindFormers training YAML without disturbing anything else in it.

This module owns the text of the training config: which keys say where the job saves
checkpoints and how it is parallelised (:func:`read_settings`), and the minimal edit that makes
the job resume the way a :class:`relaunch.plan.Plan` says (:func:`rewrite`, :func:`set_parallel`).

People review these files as diffs, so an edit is a *splice*: the file is composed with PyYAML
only to learn where each value sits (``start_mark``/``end_mark``), and the new scalar text is
written at exactly those offsets. Every comment, anchor, alias and untouched line stays
byte-identical; an anchored value (``data_parallel: &dp 1``) keeps its anchor, so every alias of
it (``dataset_strategy: [[*dp, 1], ...]``) sees the new value. A key that is missing is added as
one new line next to its siblings. Loading and dumping the YAML would expand aliases and drop
comments, which is why nothing here ever dumps a document.

Two config styles exist (FORMATS.md, "Training configs"): the legacy top-level resume keys
(``load_checkpoint``, ``resume_training``, ``auto_trans_ckpt``, ...) and, in newer MindFormers,
a ``checkpoint:`` section (Checkpoint 2.0). A rewrite edits the keys the file actually uses and
never adds keys of the other style.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

if TYPE_CHECKING:  # pragma: no cover
    from relaunch.plan import Plan

#: The top-level keys MindFormers reads to decide what to load (legacy style), in file order.
RESUME_KEYS = (
    "load_checkpoint",
    "load_ckpt_format",
    "src_strategy_path_or_dir",
    "auto_trans_ckpt",
    "resume_training",
    "remove_redundancy",
)
#: MindFormers' defaults when a key is absent.
DEFAULT_OUTPUT_DIR = "./output"
DEFAULT_CHECKPOINT_FORMAT = "ckpt"
PARALLEL_KEYS = ("data_parallel", "model_parallel", "pipeline_stage")


class ConfigError(ValueError):
    """The training config cannot be used or rewritten as asked; the message says how to fix it."""


class RelativePathError(ConfigError):
    """A path in the config is relative and no working directory was given to resolve it."""


# ----------------------------------------------------------------------------------------------
# Locating nodes


def _kind(node: Node) -> str:
    return {"scalar": "scalar", "sequence": "list", "mapping": "mapping"}.get(getattr(node, "id", ""), "node")


def _compose(text: str) -> MappingNode:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the training config is not valid YAML: {exc}") from exc
    if root is None:
        raise ConfigError("the training config is empty; expected a mapping of MindFormers keys")
    if not isinstance(root, MappingNode):
        raise ConfigError(f"the training config must be a mapping at the top level, found a {_kind(root)}")
    if root.flow_style:
        raise ConfigError("the training config is a one-line flow mapping; relaunch edits block-style YAML")
    return root


def _entry(mapping: MappingNode, key: str) -> tuple[ScalarNode, Node] | None:
    """The last ``key: value`` pair of ``mapping`` (the one YAML loaders keep on duplicates)."""
    found: tuple[ScalarNode, Node] | None = None
    for key_node, value_node in mapping.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            found = (key_node, value_node)
    return found


def _value(node: Node | None) -> Any:
    """The Python value of a composed node (aliases are already shared node objects)."""
    if node is None:
        return None
    if isinstance(node, ScalarNode):
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    if isinstance(node, SequenceNode):
        return [_value(item) for item in node.value]
    if isinstance(node, MappingNode):
        return {_value(k): _value(v) for k, v in node.value}
    return None  # pragma: no cover


def _get(mapping: MappingNode | None, key: str) -> Any:
    if mapping is None:
        return None
    entry = _entry(mapping, key)
    return None if entry is None else _value(entry[1])


def _section(root: MappingNode, key: str) -> MappingNode | None:
    entry = _entry(root, key)
    if entry is None:
        return None
    if isinstance(entry[1], MappingNode):
        return entry[1]
    if isinstance(entry[1], ScalarNode) and entry[1].value in ("", "~", "null"):
        return None
    raise ConfigError(f"`{key}` must be a mapping, found a {_kind(entry[1])}")


def _checkpoint_monitor(root: MappingNode) -> MappingNode | None:
    entry = _entry(root, "callbacks")
    if entry is None or not isinstance(entry[1], SequenceNode):
        return None
    for item in entry[1].value:
        if isinstance(item, MappingNode) and _get(item, "type") == "CheckpointMonitor":
            return item
    return None


# ----------------------------------------------------------------------------------------------
# Reading


def _int_or_default(value: Any, key: str, default: int = 1) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"parallel_config.{key} must be a positive integer, found {value!r}")
    return value


def read_settings(text: str) -> dict[str, Any]:
    """What the config says about saving, loading and parallelism, with MindFormers' defaults.

    Keys: ``style`` (``"legacy"`` or ``"checkpoint2"``), ``output_dir``, ``prefix``,
    ``checkpoint_format``, ``save_dir`` (the explicit save directory or None),
    ``checkpoint_dir`` (where checkpoints land: ``save_dir`` or ``<output_dir>/checkpoint``),
    ``strategy_dir`` (``<output_dir>/strategy``), ``data_parallel``, ``model_parallel``,
    ``pipeline_stage`` (1 when absent), ``world_size`` (their product), ``load_checkpoint``,
    ``resume_training``, ``auto_trans_ckpt``, ``load_ckpt_format``, ``save_checkpoint_steps``
    (the steps between saves, when the config says). Paths are as written
    (possibly relative to the trainer's working directory).
    """
    root = _compose(text)
    checkpoint = _section(root, "checkpoint")
    monitor = _checkpoint_monitor(root)
    parallel = _section(root, "parallel_config")
    output_dir = _get(root, "output_dir") or DEFAULT_OUTPUT_DIR
    if not isinstance(output_dir, str):
        raise ConfigError(f"output_dir must be a string path, found {output_dir!r}")
    style = "checkpoint2" if checkpoint is not None else "legacy"
    save_dir = _get(monitor, "directory") or (_get(checkpoint, "save_path") if checkpoint else None)
    prefix = _get(monitor, "prefix") or (_get(checkpoint, "prefix") if checkpoint else None)
    if save_dir is not None and not isinstance(save_dir, str):
        raise ConfigError(f"the checkpoint save directory must be a string path, found {save_dir!r}")
    dp = _int_or_default(_get(parallel, "data_parallel"), "data_parallel")
    mp = _int_or_default(_get(parallel, "model_parallel"), "model_parallel")
    pp = _int_or_default(_get(parallel, "pipeline_stage"), "pipeline_stage")
    if style == "checkpoint2":
        load_checkpoint = _get(checkpoint, "load_path")
        no_load_optim = _get(checkpoint, "no_load_optim")
        resume_training: Any = None if no_load_optim is None else not no_load_optim
    else:
        load_checkpoint = _get(root, "load_checkpoint")
        resume_training = _get(root, "resume_training")
    return {
        "style": style,
        "output_dir": output_dir,
        "prefix": None if prefix is None else str(prefix),
        "checkpoint_format": str(_get(monitor, "checkpoint_format") or DEFAULT_CHECKPOINT_FORMAT),
        "save_dir": save_dir,
        "checkpoint_dir": save_dir or posixpath.join(output_dir, "checkpoint"),
        "strategy_dir": posixpath.join(output_dir, "strategy"),
        "data_parallel": dp,
        "model_parallel": mp,
        "pipeline_stage": pp,
        "world_size": dp * mp * pp,
        "load_checkpoint": load_checkpoint,
        "resume_training": resume_training,
        "auto_trans_ckpt": _get(root, "auto_trans_ckpt"),
        "load_ckpt_format": _get(root, "load_ckpt_format"),
        "save_checkpoint_steps": _positive_or_none(
            _get(monitor, "save_checkpoint_steps")
            or (_get(checkpoint, "save_interleaved_steps") if checkpoint else None)
        ),
    }


def _positive_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _resolve(path: str, workdir: str | None, what: str) -> str:
    if posixpath.isabs(path):
        return posixpath.normpath(path)
    if workdir is None:
        raise RelativePathError(
            f"{what} is the relative path {path!r}; relaunch cannot tell where it points without the "
            "trainer's working directory: make it absolute (or give the working directory)"
        )
    return posixpath.normpath(posixpath.join(workdir, path))


def check_checkpoint_dir(text: str, expected_checkpoint_dir: str, *, workdir: str | None = None) -> None:
    """Refuse a config that saves checkpoints somewhere other than ``expected_checkpoint_dir``.

    The job's checkpoint directory is what relaunch scans; a config that saves elsewhere would
    make every recovery resume from a stale (or empty) tree.
    """
    settings = read_settings(text)
    expected = posixpath.normpath(expected_checkpoint_dir)
    if settings["save_dir"] is not None:
        key = "checkpoint.save_path" if settings["style"] == "checkpoint2" else "CheckpointMonitor directory"
        where = f"{key} {settings['save_dir']!r}"
        fix = f"set {key} to {expected!r}"
    else:
        where = f"output_dir {settings['output_dir']!r} (checkpoints go to <output_dir>/checkpoint)"
        fix = f"set output_dir to {posixpath.dirname(expected)!r}"
    actual = _resolve(settings["checkpoint_dir"], workdir, where)
    if actual != expected:
        raise ConfigError(
            f"the training config saves checkpoints to {actual!r} ({where}) but the job's checkpoint "
            f"directory is {expected!r}: {fix}, or change the job's checkpoint directory"
        )


# ----------------------------------------------------------------------------------------------
# Writing scalars

_PROPERTIES = re.compile(r"(?:[&!][^\s]*\s+)*")


def _render(value: Any, like: ScalarNode | None) -> str:
    """YAML text for ``value``, quoted the way the value it replaces was, and checked to parse back."""
    if isinstance(value, bool):
        text = "True" if value else "False"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        style = like.style if like is not None else None
        if style == '"':
            text = json.dumps(value)
        elif style == "'" or value == "":
            text = "'" + value.replace("'", "''") + "'"
        else:
            text = value
            if _parse_scalar(text) != value:
                text = "'" + value.replace("'", "''") + "'"
    elif value is None:
        text = "null"
    else:
        raise ConfigError(f"cannot write {value!r} into the config: only scalars are supported")
    if _parse_scalar(text) != value or type(_parse_scalar(text)) is not type(value):
        raise ConfigError(f"cannot write {value!r} as a YAML scalar that reads back as the same value")
    return text


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(f"k: {text}\n")["k"]
    except yaml.YAMLError:
        return object()


@dataclass
class _Edit:
    start: int
    end: int
    text: str


class _Editor:
    """Collects non-overlapping splices against the original text and applies them at once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.edits: list[_Edit] = []
        self._newline_added = False

    def set_scalar(self, node: Node, value: Any, where: str) -> None:
        if not isinstance(node, ScalarNode):
            raise ConfigError(
                f"`{where}` must be a scalar, found a {_kind(node)}; relaunch sets it to {value!r}"
            )
        if _value(node) == value and type(_value(node)) is type(value):
            return  # already right: leave the line byte-identical
        if node.style in ("|", ">"):
            raise ConfigError(f"`{where}` is a block scalar; write it on one line so relaunch can set it")
        start, end = node.start_mark.index, node.end_mark.index
        original = self.text[start:end]
        properties = _PROPERTIES.match(original)
        keep = properties.group(0) if properties else ""
        if start == end or (node.value == "" and node.style is None and not original.strip()):
            # `key:` with nothing after it: the value is implicit null; insert after the colon.
            self.edits.append(_Edit(start, end, " " + _render(value, None)))
            return
        self.edits.append(_Edit(start + len(keep), end, _render(value, node)))

    def insert(self, index: int, text: str) -> None:
        self.edits.append(_Edit(index, index, text))

    def append(self, lines: str) -> None:
        """Add whole lines at the end of the document (after a newline the text may lack)."""
        if self.text and not self.text.endswith("\n") and not self._newline_added:
            lines = "\n" + lines
            self._newline_added = True
        self.insert(len(self.text), lines)

    def apply(self) -> str:
        # Back to front, so earlier offsets stay valid; of two inserts at one offset the one
        # collected first ends up first.
        result = self.text
        order = sorted(enumerate(self.edits), key=lambda item: (item[1].start, item[1].end, item[0]))
        for _, edit in reversed(order):
            result = result[: edit.start] + edit.text + result[edit.end :]
        return result


def _line_end(text: str, index: int) -> int:
    """Index just past the newline that ends the line holding ``index`` (or the text's end)."""
    newline = text.find("\n", index)
    return len(text) if newline < 0 else newline + 1


def _set_in_mapping(editor: _Editor, mapping: MappingNode, values: Mapping[str, Any], where: str) -> None:
    """Set each key of ``values`` in ``mapping``; missing keys become new lines after its last entry."""
    missing: list[str] = []
    for key, value in values.items():
        entry = _entry(mapping, key)
        if entry is None:
            missing.append(key)
        else:
            editor.set_scalar(entry[1], value, f"{where}{key}")
    if not missing:
        return
    if mapping.flow_style or not mapping.value:
        raise ConfigError(
            f"cannot add {', '.join(missing)} to `{where.rstrip('.') or 'the top level'}`: it is written as "
            "a flow mapping ({...}); write it in block style"
        )
    column = mapping.value[0][0].start_mark.column
    last_value = mapping.value[-1][1]
    if not isinstance(last_value, ScalarNode):
        # After a nested block: insert at the block's end, which PyYAML puts at a line start.
        at = last_value.end_mark.index
        at = at if at == 0 or editor.text[at - 1] == "\n" else _line_end(editor.text, at)
    else:
        at = _line_end(editor.text, last_value.end_mark.index)
    lines = "".join(f"{' ' * column}{key}: {_render(values[key], None)}\n" for key in missing)
    if at == len(editor.text):
        editor.append(lines)
    else:
        editor.insert(at, lines)


def _set_top_level(editor: _Editor, root: MappingNode, values: Mapping[str, Any]) -> None:
    """Set top-level keys; a missing one goes right after the last resume key present."""
    anchor_index = None
    for key in RESUME_KEYS:
        entry = _entry(root, key)
        if entry is not None and isinstance(entry[1], ScalarNode):
            anchor_index = _line_end(editor.text, entry[1].end_mark.index)
    missing: dict[str, Any] = {}
    for key, value in values.items():
        entry = _entry(root, key)
        if entry is None:
            missing[key] = value
        else:
            editor.set_scalar(entry[1], value, key)
    if not missing:
        return
    lines = "".join(f"{key}: {_render(value, None)}\n" for key, value in missing.items())
    if anchor_index is None or anchor_index == len(editor.text):
        editor.append(lines)
    else:
        editor.insert(anchor_index, lines)


# ----------------------------------------------------------------------------------------------
# Parallel sizes


def parallel_for_world_size(
    world_size: int, model_parallel: int, pipeline_stage: int
) -> tuple[int, int, int]:
    """``(data_parallel, model_parallel, pipeline_stage)`` for ``world_size``, keeping mp and pp.

    Only data parallelism changes with the world size: model parallelism and pipeline stages
    fix how each parameter is cut, and the training recipe (micro batches, layer offsets) is
    written for them.
    """
    if world_size < 1:
        raise ConfigError(f"the world size must be at least 1, found {world_size}")
    per_replica = model_parallel * pipeline_stage
    if world_size % per_replica:
        raise ConfigError(
            f"a world size of {world_size} ranks cannot be factored as data_parallel x model_parallel "
            f"({model_parallel}) x pipeline_stage ({pipeline_stage}): it must be a multiple of "
            f"{per_replica}; choose such a size or change model_parallel/pipeline_stage in the config"
        )
    return world_size // per_replica, model_parallel, pipeline_stage


def _set_parallel(editor: _Editor, root: MappingNode, sizes: Mapping[str, int]) -> None:
    entry = _entry(root, "parallel_config")
    if entry is None:
        body = "".join(f"  {key}: {value}\n" for key, value in sizes.items())
        editor.append(f"parallel_config:\n{body}")
        return
    section = entry[1]
    if not isinstance(section, MappingNode):
        raise ConfigError(f"`parallel_config` must be a mapping, found a {_kind(section)}")
    old_dp_entry = _entry(section, "data_parallel")
    _set_in_mapping(editor, section, sizes, "parallel_config.")
    # `parallel.dataset_strategy` splits each input's batch dimension by data_parallel. With an
    # alias (`[*dp, 1]`) it follows the anchor by itself; a literal copy of the old size must be
    # changed along, or MindSpore rejects the dataset strategy at compile time.
    if old_dp_entry is None or "data_parallel" not in sizes:
        return
    old_dp_node = old_dp_entry[1]
    old_dp = _value(old_dp_node)
    parallel = _section(root, "parallel")
    strategy = _entry(parallel, "dataset_strategy") if parallel is not None else None
    if strategy is None or not isinstance(strategy[1], SequenceNode) or old_dp == sizes["data_parallel"]:
        return
    edited: set[int] = set()
    for item in strategy[1].value:
        if not isinstance(item, SequenceNode) or not item.value:
            continue
        first = item.value[0]
        if first is old_dp_node or id(first) in edited:
            continue  # an alias of the anchor: the anchor's edit already covers it
        if isinstance(first, ScalarNode) and _value(first) == old_dp:
            edited.add(id(first))
            editor.set_scalar(first, sizes["data_parallel"], "parallel.dataset_strategy[][0]")


def set_parallel(
    text: str,
    *,
    data_parallel: int,
    model_parallel: int | None = None,
    pipeline_stage: int | None = None,
) -> str:
    """Set ``parallel_config`` sizes (those given), keeping every other byte of ``text``."""
    root = _compose(text)
    sizes = {"data_parallel": data_parallel}
    if model_parallel is not None:
        sizes["model_parallel"] = model_parallel
    if pipeline_stage is not None:
        sizes["pipeline_stage"] = pipeline_stage
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel_config.{key} must be a positive integer, got {value!r}")
    editor = _Editor(text)
    _set_parallel(editor, root, sizes)
    return editor.apply()


# ----------------------------------------------------------------------------------------------
# Rewriting for a plan


def _points_into(path: Any, directory: str, workdir: str | None) -> bool:
    if not isinstance(path, str) or not path:
        return False
    if not posixpath.isabs(path) and workdir is None:
        # Without the working directory, compare as written: './output/checkpoint' and the like.
        target = posixpath.normpath(path)
        return target == posixpath.normpath(directory) or target.startswith(
            posixpath.normpath(directory).rstrip("/") + "/"
        )
    target = posixpath.normpath(path if posixpath.isabs(path) else posixpath.join(workdir or "", path))
    base = posixpath.normpath(directory)
    return target == base or target.startswith(base.rstrip("/") + "/")


def rewrite(
    text: str,
    plan: Plan,
    *,
    expected_checkpoint_dir: str | None = None,
    workdir: str | None = None,
) -> str:
    """The config ``text`` edited so the job starts as ``plan`` says; everything else byte-identical.

    - ``resume``/``convert``: the plan's ``config`` keys (``load_checkpoint``, ``resume_training``,
      ``auto_trans_ckpt``, ``src_strategy_path_or_dir``, ``load_ckpt_format``,
      ``remove_redundancy``) are set; with a ``checkpoint:`` section, ``checkpoint.load_path`` and
      ``checkpoint.no_load_optim`` instead (legacy keys already in the file are kept consistent,
      none is added).
    - ``fresh``: ``resume_training`` becomes false and a ``load_checkpoint`` that points into the
      (empty) checkpoint directory is cleared; pretrained weights loaded from elsewhere stay.
    - ``plan.parallel``: ``parallel_config`` sizes for the new world size.
    - ``fail``: refused (:class:`ConfigError`), since there is nothing to start.

    ``expected_checkpoint_dir`` (the job's checkpoint directory) makes a config that saves its
    checkpoints elsewhere an error; relative paths in the config are resolved against
    ``workdir`` (the trainer's working directory) when given.
    """
    if plan.action == "fail":
        raise ConfigError(f"the plan is to fail ({plan.message}); there is no config to render")
    if expected_checkpoint_dir is not None:
        check_checkpoint_dir(text, expected_checkpoint_dir, workdir=workdir)
    root = _compose(text)
    checkpoint = _section(root, "checkpoint")
    editor = _Editor(text)

    values: dict[str, Any] = dict(plan.config)
    if plan.action == "fresh":
        values = {"resume_training": False}
        current = _get(checkpoint, "load_path") if checkpoint is not None else _get(root, "load_checkpoint")
        # The job's checkpoint dir, or the config's own spelling of it ('./output/checkpoint').
        own = read_settings(text)["checkpoint_dir"]
        if _points_into(current, plan.checkpoint_dir, workdir) or _points_into(current, own, None):
            values["load_checkpoint"] = ""

    if checkpoint is not None:
        if plan.layout == "v1" and plan.action != "fresh":
            raise ConfigError(
                "the config has a `checkpoint:` section (Checkpoint 2.0) but the checkpoint tree holds "
                "Checkpoint 1.0 files (rank_<r>/...); remove the `checkpoint:` section to resume them"
            )
        section_values: dict[str, Any] = {}
        if "load_checkpoint" in values:
            section_values["load_path"] = values["load_checkpoint"]
        if "resume_training" in values:
            section_values["no_load_optim"] = not bool(values["resume_training"])
        _set_in_mapping(editor, checkpoint, section_values, "checkpoint.")
        legacy = {key: values[key] for key in RESUME_KEYS if key in values and _entry(root, key) is not None}
        if "resume_training" in legacy:
            legacy["resume_training"] = bool(legacy["resume_training"])  # 2.0 requires a bool
        _set_top_level(editor, root, legacy)
    else:
        if plan.layout == "v2" and plan.action != "fresh":
            raise ConfigError(
                "the checkpoint tree is Checkpoint 2.0 (iteration_<n>/) but the config uses the legacy "
                "top-level keys; add a `checkpoint:` section so MindFormers loads Checkpoint 2.0"
            )
        _set_top_level(editor, root, {key: values[key] for key in RESUME_KEYS if key in values})

    if plan.parallel is not None:
        _set_parallel(editor, root, plan.parallel)
    return editor.apply()


def load_text(path: str) -> str:
    """Read a config file as text (UTF-8), with an error that names the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the training config is not UTF-8 text ({exc})") from exc


__all__ = [
    "DEFAULT_CHECKPOINT_FORMAT",
    "DEFAULT_OUTPUT_DIR",
    "PARALLEL_KEYS",
    "RESUME_KEYS",
    "ConfigError",
    "RelativePathError",
    "check_checkpoint_dir",
    "load_text",
    "parallel_for_world_size",
    "read_settings",
    "rewrite",
    "set_parallel",
]
