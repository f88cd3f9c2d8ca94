"""``--cfg-options KEY=VALUE ...``, checked: every key must exist in the config, or be named
new with ``--cfg-new-keys``, and every value arrives as the user wrote it.

mmengine's ``DictAction`` merges any key, so a typo (``optim_wraper.optimizer.lr``) became a
new setting that nothing read, and it drops every space and splits at every comma, so a path
such as ``/tmp/a b/c.pth`` arrived as ``/tmp/ab/c.pth``. The rules, as ``--help`` states them
(:data:`VALUE_RULES`):

- a key is a dotted path through the config's dicts and lists (``param_scheduler.1.end``);
  ``P._delete_=True`` replaces the dict ``P`` by the keys given under it;
- ``None``, ``true``/``false``, numbers and Python literals (``[1, 2]``, ``(512, 512)``,
  ``{'embed_dims': [64, 128]}``) are parsed; mmengine's unquoted lists (``[a,b]``, ``a,b``)
  too, except where the text is kept;
- the text is kept as written (spaces and commas included) for a setting that holds a
  string and for a path (text with a ``/``), unless it is in brackets.
"""
import argparse
import ast
import difflib
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from mmengine.config import Config, DictAction

DELETE_KEY = '_delete_'  # mmengine's: the dict it is in replaces the one it merges into
NEW_KEYS_OPTION = '--cfg-new-keys'
VALUE_RULES = (
    'A key must exist in the config (a.b.0.c reaches into lists); a new one must also be '
    f'named in {NEW_KEYS_OPTION}. Values: None, true/false, numbers and Python literals '
    "([1, 2], (512, 512), \"{'embed_dims': [64, 128]}\") are parsed; a setting that holds a "
    'string, and a path (text with a /), keep the text as written, spaces and commas '
    'included; elsewhere a,b is a list. Brackets make a list of a string setting: [a,b].')

_MISSING = object()


class OverrideError(ValueError):
    """A ``--cfg-options`` entry that is refused; the message names it and says why."""


def key_value(text: str) -> Tuple[str, str]:
    """``'KEY=VALUE'`` as ``(KEY, VALUE)`` text, for argparse's ``type``."""
    key, equals, value = text.partition('=')
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE (e.g. '
                                         f'train_cfg.max_epochs=2)')
    return key.strip(), value


def add_override_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """Add ``--cfg-options`` (a list of ``(key, text)``) and ``--cfg-new-keys``.

    Args:
        parser (ArgumentParser): The tool's parser.
        example (str): ``KEY=VALUE`` examples for the help.
    """
    parser.add_argument('--cfg-options', nargs='+', type=key_value, default=[],
                        metavar='KEY=VALUE',
                        help=f'override config settings, e.g. {example}. {VALUE_RULES}')
    parser.add_argument(NEW_KEYS_OPTION, nargs='+', default=[], metavar='KEY',
                        help='keys that --cfg-options may add although the config lacks them '
                        '(the key and everything under it)')


def _lookup(cfg: Any, key: str) -> Any:
    """The value at the dotted ``key``, or ``_MISSING``."""
    node = cfg
    for part in key.split('.'):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _dotted_keys(node: Any, prefix: str = '') -> Iterator[str]:
    """Every dotted key of ``node``, containers and leaves (list items by index)."""
    if isinstance(node, dict):
        items = ((str(key), value) for key, value in node.items())
    elif isinstance(node, list):
        items = ((str(index), value) for index, value in enumerate(node))
    else:
        return
    for name, value in items:
        key = f'{prefix}{name}'
        yield key
        yield from _dotted_keys(value, f'{key}.')


def _check_key(cfg: dict, key: str, allowed_new: Sequence[str], config: str) -> None:
    if any(key == new or key.startswith(f'{new}.') for new in allowed_new):
        return
    parts = key.split('.')
    for depth in range(1, len(parts)):
        parent = _lookup(cfg, '.'.join(parts[:depth]))
        if isinstance(parent, tuple) and parts[depth].isdigit():
            raise OverrideError(
                f'--cfg-options {key}: {".".join(parts[:depth])} is a tuple, whose items '
                f'cannot be set one by one; give the whole value, e.g. '
                f'{".".join(parts[:depth])}="{tuple(parent)!r}" with your change')
    if _lookup(cfg, key) is not _MISSING:
        return
    near = difflib.get_close_matches(key, list(_dotted_keys(cfg)), n=1, cutoff=0.6)
    hint = f'did you mean {near[0]}? ' if near else ''
    raise OverrideError(f'--cfg-options {key}: no such key in {config}; {hint}To add it as '
                        f'a new setting, also pass {NEW_KEYS_OPTION} {key}')


def _unquoted(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
        return text[1:-1]
    return text


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _MISSING


def parse_value(key: str, text: str, current: Any = _MISSING) -> Any:
    """The value that ``--cfg-options KEY=TEXT`` sets (:data:`VALUE_RULES`).

    Args:
        key (str): The dotted key, for messages.
        text (str): The value as given on the command line.
        current (Any): The config's value at ``key``; absent for a new key.

    Raises:
        OverrideError: A dict that is not a Python literal, or a bracketed value that
            cannot be read.
    """
    text = _unquoted(text)
    if text == 'None':
        return None
    if text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    bracketed = text[:1] in '[({'
    literal = _literal(text)
    if literal is not _MISSING and (bracketed or isinstance(literal, (int, float))):
        return literal
    if not bracketed and (isinstance(current, str) or '/' in text):
        return text  # a string setting or a path: as written
    if not bracketed and ',' not in text:
        return DictAction._parse_int_float_bool(text)  # inf, nan; other text as written
    if text.startswith('{'):
        raise OverrideError(f'--cfg-options {key}={text}: a dict must be a Python literal with '
                            f"quoted keys, e.g. {key}=\"{{'embed_dims': [64, 128]}}\"")
    try:  # mmengine's unquoted forms: a,b and [a,b] (its parser recurses on bad brackets)
        return DictAction._parse_iterable(text)
    except (RecursionError, ValueError, IndexError) as error:
        raise OverrideError(f'--cfg-options {key}={text}: cannot read the value ({error}); '
                            f"write it as a Python literal, e.g. {key}=\"['a', 'b']\"")


def _value_holding(tree: dict, key: str) -> str:
    """The ancestor of ``key`` that holds a value and no dict or list (``model.neck=None``
    under ``model.neck.type``), or ``''``: a new key under it replaces it."""
    parts = key.split('.')
    for depth in range(1, len(parts)):
        prefix = '.'.join(parts[:depth])
        value = _lookup(tree, prefix)
        if value is _MISSING:
            return ''
        if not isinstance(value, (dict, list)):
            return prefix
    return ''


def _leaf_keys(key: str, value: Any, current: Any) -> Iterator[str]:
    """The keys a dict value merges into a dict: each must exist, as keys given singly."""
    if isinstance(value, dict) and isinstance(current, dict) and DELETE_KEY not in value:
        for name, item in value.items():
            yield from _leaf_keys(f'{key}.{name}', item, current.get(name, _MISSING))
    else:
        yield key


def apply_overrides(cfg: Config, options: Sequence[Tuple[str, str]],
                    new_keys: Sequence[str] = (), config: str = 'the config') -> Dict[str, Any]:
    """Check ``--cfg-options`` against ``cfg`` and merge them into it.

    Every key is checked before anything is merged.

    Args:
        cfg (Config): The loaded config, changed in place.
        options (Sequence[tuple[str, str]]): ``(key, text)`` pairs, as :func:`key_value`
            gives them; a later one wins.
        new_keys (Sequence[str]): Keys allowed to be absent (with everything under them).
        config (str): The config's path, for messages.

    Returns:
        dict: The merged values, by key.

    Raises:
        OverrideError: A key absent from the config and from ``new_keys`` (with the nearest
            existing key), or a value that cannot be read.
    """
    tree = dict(cfg.items())
    replaced = [key[:-len(DELETE_KEY) - 1] for key, _ in options
                if key.endswith(f'.{DELETE_KEY}')]
    allowed = [*new_keys, *replaced]
    values: Dict[str, Any] = {}
    for key, text in options:
        parent, _, name = key.rpartition('.')
        if name == DELETE_KEY:
            _check_key(tree, parent, new_keys, config)
            values[key] = parse_value(key, text)
            continue
        _check_key(tree, key, allowed, config)
        current = _lookup(tree, key)
        value = parse_value(key, text, current)
        if isinstance(value, dict):
            for leaf in _leaf_keys(key, value, current):
                _check_key(tree, leaf, allowed, config)
            if current is not _MISSING and not isinstance(current, dict):
                value = {DELETE_KEY: True, **value}  # a dict over a string (an arch preset)
        values[key] = value
        holding = _value_holding(tree, key)
        if holding:  # mmengine merges no dict into a value; the new dict replaces it
            values[f'{holding}.{DELETE_KEY}'] = True
    cfg.merge_from_dict(values)
    return values


def option_texts(options: Sequence[Tuple[str, str]]) -> List[str]:
    """``(key, text)`` pairs back as ``KEY=TEXT`` arguments, e.g. to pass to another tool."""
    return [f'{key}={text}' for key, text in options]
