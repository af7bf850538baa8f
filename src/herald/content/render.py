"""Rendering tenants' templates: Jinja2 in a sandbox with budgets for time, steps and size.

Templates come from tenants, so they are untrusted code. They run in Jinja's
``ImmutableSandboxedEnvironment`` (no ``_private`` or internal attributes, no mutation of
lists and dicts) with no loader (``include``/``import``/``extends`` are refused at compile
time) and only these globals: ``range`` (capped at 100,000 items), ``dict``, ``cycler``,
``joiner``, ``namespace``. HTML parts autoescape; subject, text, SMS and webhook bodies do not.

Budgets (``RenderLimits``), enforced while rendering, not after:

* time and steps: every loop iteration, call, filter, operator and output is a step; each step
  checks the step count, and every ``_CLOCK_EVERY`` steps the rendering thread's CPU time, so
  nested loops stop within a few iterations. CPU time, not wall-clock time: a render that waits
  for the CPU on a busy machine (other processes, another thread holding the GIL) has done no
  more work, and must not fail a drop's line or an API request for it.
* size: no value a template builds may exceed ``output_chars`` (string repetition, ``+``, ``~``,
  ``%``/``format`` widths, padding, ``replace``, ``join``, ``**`` are checked *before* they
  allocate), the output is counted chunk by chunk, and everything a render produces counts
  against ``alloc_chars`` so a loop cannot pile up memory in captured blocks or macros.

Undefined variables. At send time (``render``, ``render_message``, the preview) a missing
variable is an error when printed or computed with (strict), but false in ``{% if %}``:
sending "Your code is " is worse than a request refused with "text: line 1: 'dict object' has
no attribute 'code'". Optional values use ``{% if data.name %}`` or ``| default('customer')``.
At upload (``validate_template``) the data is not known, so missing variables are placeholders
that chain, call, iterate as empty and render as ``0``; syntax, forbidden attributes, budgets
and errors on constants (``1/0``) are still caught, with the line.

``None`` renders as an empty string. The template context is ``template_context(...)``:
``data`` (the event's data), ``event`` and ``recipient``.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NoReturn, cast

from jinja2 import (
    ChainableUndefined,
    Environment,
    StrictUndefined,
    Template,
    TemplateSyntaxError,
    Undefined,
    nodes,
    pass_context,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.filters import FILTERS
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.tests import TESTS
from jinja2.utils import Cycler, Joiner, Namespace
from jinja2.visitor import NodeTransformer

from herald.errors import HeraldError, ValidationError

# ---------------------------------------------------------------- public names


class RenderError(HeraldError):
    """A template failed to render; ``field`` names the part, the message names the line."""

    code = "render_error"
    status = 422
    title = "Template could not be rendered"


@dataclass(frozen=True)
class RenderLimits:
    """Per part and per render. ``alloc_chars`` bounds everything produced along the way."""

    time_ms: int = 200
    steps: int = 1_000_000
    output_chars: int = 256 * 1024
    alloc_chars: int = 4 * 1024 * 1024
    source_chars: int = 128 * 1024


DEFAULT_LIMITS = RenderLimits()
PART_NAMES = ("subject", "text", "html", "body")


@dataclass(frozen=True)
class ChannelParts:
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def allowed(self) -> tuple[str, ...]:
        return self.required + self.optional


CHANNEL_PARTS: dict[str, ChannelParts] = {
    "email": ChannelParts(required=("subject", "text"), optional=("html",)),
    "sms": ChannelParts(required=("text",)),
    "webhook": ChannelParts(required=("body",)),
}

MAX_TEMPLATE_NODES = 10_000
MAX_DEPTH = 64  # data from the API is at most 32 deep
MAX_INT_BITS = 10_000  # about 3,000 digits: more than any notification needs, cheap to compute
_MAX_COUNT = 10_000  # ``batch``/``slice`` sizes
_MAX_ERROR_CHARS = 300
_TEMPLATE_FILE = "<template>"

# ---------------------------------------------------------------- budget


# Steps between two reads of the CPU clock (a system call, ~0.5 µs, where a step is ~0.25 µs).
_CLOCK_EVERY = 32


class _LimitError(Exception):
    """A render budget ran out."""


@dataclass
class _Budget:
    limits: RenderLimits
    deadline: float  # in the rendering thread's CPU time (``time.thread_time``)
    steps: int = 0
    chars: int = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.steps:
            raise _LimitError(f"more than {self.limits.steps} steps")
        if not self.steps % _CLOCK_EVERY and time.thread_time() > self.deadline:
            raise _LimitError(f"took more than {self.limits.time_ms} ms of CPU")

    def check(self, size: int, what: str = "a value") -> None:
        if size > self.limits.output_chars:
            raise _LimitError(f"{what} is longer than {self.limits.output_chars} characters")

    def charge(self, size: int) -> None:
        self.chars += size
        if self.chars > self.limits.alloc_chars:
            raise _LimitError(f"produced more than {self.limits.alloc_chars} characters in all")

    def produced(self, value: Any) -> None:
        """Check and charge a value the template just built."""
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")
        size = _weight(value, self.limits.output_chars)
        self.check(size)
        self.charge(size)


_BUDGET: ContextVar[_Budget | None] = ContextVar("herald_render_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # only render() evaluates templates; compile-time folding is off
        raise _LimitError("templates are evaluated only inside render()")
    return budget


def _weight(value: Any, limit: int) -> int:
    """About how many characters ``str(value)`` or its JSON takes; stops counting past ``limit``.

    Shared references count each time they appear, so a value built by doubling a list cannot
    hide its size. Nesting deeper than ``MAX_DEPTH`` is refused: hashing, comparing or printing
    such a value recurses in C.
    """
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any] = ()
        if isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif item is None or isinstance(item, bool | float):
            total += 8
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            children = [*item.keys(), *item.values()] if total <= limit else ()
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            children = item if total <= limit else ()
        elif isinstance(item, Namespace):  # its repr shows everything it holds
            attrs: dict[str, Any] = object.__getattribute__(item, "_Namespace__attrs")
            total += 12 + 4 * len(attrs)
            children = [*attrs.keys(), *attrs.values()] if total <= limit else ()
        else:
            total += 16
        if total > limit:
            return total
        if children and depth >= MAX_DEPTH:
            raise _LimitError(f"a value nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
    return total


# ---------------------------------------------------------------- checks before allocating


def _too_big(what: str, limit: int) -> NoReturn:
    raise _LimitError(f"{what} would be longer than {limit} characters")


def _check_number(value: Any, limit: int, what: str) -> None:
    if isinstance(value, int) and not -limit <= value <= limit:
        _too_big(what, limit)


_PRINTF = re.compile(r"%(?:%|(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?)")


def _check_printf(template: Any, limit: int) -> None:
    """``'%9999999d' % x`` allocates before anyone can count; refuse such widths."""
    if not isinstance(template, str | bytes):
        return
    text = template if isinstance(template, str) else template.decode("latin-1")
    for match in _PRINTF.finditer(text):
        for group in match.groups():
            if group == "*":
                raise SecurityError("'*' widths in % formats are not supported")
            if group and (len(group) > 7 or int(group) > limit):
                _too_big("a % format width", limit)


def _check_format(template: str, limit: int) -> None:
    """The same for ``'{:9999999}'.format(x)``; nested fields in a spec are refused."""
    for _literal, field, spec, _conversion in string.Formatter().parse(template):
        if field is None or not spec:
            continue
        if "{" in spec:
            raise SecurityError("nested fields in format specs are not supported")
        for digits in re.findall(r"\d+", spec):
            if len(digits) > 7 or int(digits) > limit:
                _too_big("a format width", limit)


_SEQUENCES = (str, bytes, list, tuple)


def _check_binop(operator: str, left: Any, right: Any, limit: int) -> None:
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and isinstance(times, int) and times > 0:
                if _weight(seq, limit) * times > limit:
                    _too_big("a repeated value", limit)
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * min(right, MAX_INT_BITS + 1) > MAX_INT_BITS:
                raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")
    elif operator == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            if _weight(left, limit) + _weight(right, limit) > limit:
                _too_big("a sum", limit)
    elif operator == "%":
        _check_printf(left, limit)


# str methods that cannot grow a string beyond a small factor of its length
_STR_METHODS = frozenset(
    "capitalize casefold count decode encode endswith find index isalnum isalpha isascii isdecimal isdigit "
    "isidentifier islower isnumeric isprintable isspace istitle isupper lower lstrip partition removeprefix "
    "removesuffix rfind rindex rpartition rsplit rstrip split splitlines startswith strip swapcase title upper "
    "striptags unescape hex".split()
)
_DICT_VIEWS = frozenset({"get", "keys", "values", "items"})


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> tuple[Any, ...]:
    """Refuse calls that would allocate too much; returns the arguments (a ``join`` input materialised)."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, str | bytes):
        if name in _STR_METHODS:
            return args
        if name in ("center", "ljust", "rjust", "zfill"):
            _check_number(args[0] if args else 0, limit, name)
        elif name == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            tab: str | bytes = "\t" if isinstance(owner, str) else b"\t"
            if isinstance(tabsize, int) and len(owner) + owner.count(tab) * tabsize > limit:  # type: ignore[arg-type]
                _too_big("expandtabs", limit)
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1, limit)
        elif name == "join" and args:
            items = _joinable(args[0], owner, limit)
            return (items, *args[1:])
        else:
            raise SecurityError(f"{type(owner).__name__}.{name}() is not allowed in templates")
    elif isinstance(owner, int) and name == "to_bytes":
        _check_number(args[0] if args else kwargs.get("length", 1), limit, "to_bytes")
    return args


def _check_replace(value: Any, old: Any, new: Any, count: Any, limit: int) -> None:
    text = value if isinstance(value, str | bytes) else str(value)
    if not isinstance(old, type(text)) or not isinstance(new, type(text)):
        old, new, text = str(old), str(new), str(text)
    found = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    if len(text) + found * max(len(new) - len(old), 0) > limit:
        _too_big("replace", limit)


def _joinable(items: Iterable[Any], separator: Any, limit: int) -> list[Any]:
    out: list[Any] = []
    size = 0
    sep = len(separator) if isinstance(separator, str | bytes) else 0
    for item in items:
        size += _weight(item, limit) + (sep if out else 0)
        if size > limit:
            _too_big("a join", limit)
        out.append(item)
    return out


# ---------------------------------------------------------------- filters and tests


def _precheck(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> Any:
    """Refuse a filter call that would allocate or loop too much; returns ``value`` (``join``'s materialised)."""

    def arg(index: int, key: str, default: Any = None) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    if name == "center":
        _check_number(arg(0, "width", 80), limit, name)
    elif name == "indent":
        width, text = arg(0, "width", 4), str(value)
        per_line = width if isinstance(width, int) else len(str(width))
        if len(text) + (text.count("\n") + 1) * max(per_line, 0) > limit:
            _too_big(name, limit)
    elif name == "wordwrap":
        width, text = arg(0, "width", 79), str(value)
        lines = len(text) // max(width, 1) + 1 if isinstance(width, int) else len(text)
        if len(text) + lines * len(str(arg(2, "wrapstring") or "\n")) > limit:
            _too_big(name, limit)
    elif name == "replace" and len(args) >= 2:
        count = arg(2, "count")
        _check_replace(value, args[0], args[1], -1 if count is None else count, limit)
    elif name == "format":
        _check_printf(value, limit)
    elif name == "join":
        return _joinable(value, arg(0, "d", ""), limit)
    elif name == "sum" and not isinstance(arg(1, "start", 0), int | float):
        raise TypeError("sum: only numbers can be summed")  # sum(start=[]) concatenates quadratically
    elif name in ("batch", "slice"):
        _check_number(arg(0, "linecount" if name == "batch" else "slices", 1), _MAX_COUNT, f"a {name}")
    elif name == "round" and isinstance(precision := arg(0, "precision", 0), int) and abs(precision) > 100:
        raise ValueError("round: precision must be between -100 and 100")
    elif name == "tojson" and (indent := arg(0, "indent")) is not None and indent not in range(9):
        raise ValueError("tojson: indent must be between 0 and 8")
    if name in ("string", "tojson") and _weight(value, limit) > limit:
        _too_big("a string", limit)
    return value


# Left out: ``random`` (a preview would differ from the send), ``urlize`` and ``pprint`` (their
# output grows with arguments or nesting in ways not worth bounding; no notification needs them).
_FILTERS = sorted(set(FILTERS) - {"random", "urlize", "pprint"})
_PART_FILTERS = frozenset({"first", "last", "attr", "default", "d", "min", "max"})  # return what they got


def _guard(name: str, func: Callable[..., Any], *, is_filter: bool) -> Callable[..., Any]:
    """``func`` (a filter or test) behind a step, its pre-check and a size check of its result.

    The guard takes the context, which also keeps Jinja from running it at compile time.
    """
    pass_arg = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    @pass_context
    def guarded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if is_filter:
            value = _precheck(name, value, args, kwargs, budget.limits.output_chars)
        elif name in ("odd", "even", "divisibleby"):  # they apply ``%`` to the value
            _check_printf(value, budget.limits.output_chars)
        if pass_arg == "context":
            result = func(context, value, *args, **kwargs)
        elif pass_arg == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if is_filter and result is not value and name not in _PART_FILTERS:
            budget.produced(result)
        return result

    guarded.__name__ = f"guarded_{name}"
    return guarded


# ---------------------------------------------------------------- undefined values


class _Missing(StrictUndefined):
    """Strict, except that a missing value is false: ``{% if data.note %}`` works for optional
    fields, while printing, iterating or computing with a missing value is still an error."""

    def __bool__(self) -> bool:  # type: ignore[override]  # StrictUndefined's raises; ours is plain false
        return False


class _Placeholder(ChainableUndefined):
    """A variable the upload-time sample render does not know: chains, calls, does arithmetic,
    iterates as empty, compares false and renders as ``0`` (so a JSON body stays parseable)."""

    __slots__ = ()

    def __str__(self) -> str:
        return "0"

    __html__ = __str__

    def __format__(self, spec: str) -> str:
        for stand_in in (0, "0"):
            try:
                return format(stand_in, spec)
            except (TypeError, ValueError):
                continue
        return "0"

    def _same(self, *_args: Any, **_kwargs: Any) -> _Placeholder:
        return self

    def _false(self, _other: Any) -> bool:
        return False

    def _zero(self, *_args: Any) -> int:
        return 0

    def __getitem__(self, key: Any) -> _Placeholder:  # type: ignore[override]
        if isinstance(key, str) and key.startswith("__"):  # Python internals; ``_id`` may be a real key
            raise SecurityError(f"access to attribute {key!r} is unsafe")
        return self

    __call__ = _same  # type: ignore[assignment]
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same  # type: ignore[assignment]
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _same  # type: ignore[assignment]
    __pow__ = __rpow__ = __pos__ = __neg__ = _same  # type: ignore[assignment]
    __lt__ = __le__ = __gt__ = __ge__ = _false  # type: ignore[assignment]
    __int__ = __index__ = __round__ = __abs__ = _zero  # type: ignore[assignment]

    def __float__(self) -> float:  # type: ignore[override]
        return 0.0


def _json_default(value: Any) -> Any:
    """``tojson`` of an undefined value: ``null`` for a placeholder, the undefined error otherwise."""
    if isinstance(value, _Placeholder):
        return None
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises "'x' is undefined"
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@pass_context
def _finalize(_context: Context, value: Any) -> Any:
    """Every ``{{ … }}`` passes here: a step, a size check and a charge; ``None`` renders empty."""
    budget = _budget()
    budget.step()
    if value is None:
        return ""
    budget.produced(value)
    return value


# ---------------------------------------------------------------- the sandbox


class _Guard(NodeTransformer):
    """Rewrites a parsed template so loops, ``~`` and literals pass through the budget."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def _call(self, hook: str, args: list[nodes.Node], lineno: int) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(hook), args, [], None, None, lineno=lineno)
        call.set_lineno(lineno)
        call.set_environment(self.environment)
        return call

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._call("guard_iter", [node.iter], node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._call("guard_join", list(node.nodes), node.lineno)

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return self._call("guard_literal", [node], node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return self._literal(node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return self._literal(node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        if node.ctx != "load":  # an assignment target
            self.generic_visit(node)
            return node
        return self._literal(node)

    def _refuse(self, node: nodes.Node) -> NoReturn:
        tag = {"Extends": "extends", "Include": "include", "Import": "import"}.get(type(node).__name__, "from … import")
        raise TemplateSyntaxError(f"{{% {tag} %}} is not supported: a template cannot load another", node.lineno)

    visit_Extends = visit_Include = visit_Import = visit_FromImport = _refuse


class _GuardedCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        # Compiling costs about 50 µs a node: bound it (a long static HTML email is a handful).
        for count, child in enumerate(node.find_all(nodes.Node)):
            if count >= MAX_TEMPLATE_NODES:
                raise TemplateSyntaxError(
                    f"too complex: more than {MAX_TEMPLATE_NODES} tags and expressions", child.lineno
                )
        _Guard(self.environment).visit(node)
        super().visit_Template(node, frame)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with Herald's budgets; see the module docstring."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, *, autoescape: bool, placeholders: bool) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=_Placeholder if placeholders else _Missing,
            finalize=_finalize,
            optimized=False,  # no constant folding: every expression is evaluated under a budget
            trim_blocks=True,
            lstrip_blocks=True,
            cache_size=0,
            auto_reload=False,
        )
        self.globals = {"range": safe_range, "dict": dict, "cycler": Cycler, "joiner": Joiner, "namespace": Namespace}
        self.filters = {name: _guard(name, FILTERS[name], is_filter=True) for name in _FILTERS}
        tests = cast(dict[str, Callable[..., Any]], TESTS)
        self.tests = {name: _guard(name, test, is_filter=False) for name, test in tests.items()}
        self.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": _json_default}

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """Refuse at once rather than hand back an undefined value that might render quietly."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        args = _check_call(obj, args, kwargs, budget.limits.output_chars)
        result = super().call(context, obj, *args, **kwargs)
        owner = getattr(obj, "__self__", None)
        if not (isinstance(owner, dict) and getattr(obj, "__name__", "") in _DICT_VIEWS):
            budget.produced(result)
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        _check_binop(operator, left, right, budget.limits.output_chars)
        result = self.binop_table[operator](left, right)
        if isinstance(result, int):
            if result.bit_length() > MAX_INT_BITS:
                raise _LimitError(f"an integer larger than {MAX_INT_BITS} bits")
        elif isinstance(result, str | bytes | list | tuple):
            budget.produced(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            _check_format(value.__self__, _budget().limits.output_chars)
        return wrapper

    def concat(self, parts: Iterable[str]) -> str:
        """Joins captured output (``{% set %}`` blocks, macros, ``{% filter %}``) within the budget."""
        budget = _budget()
        collected: list[str] = []
        size = 0
        for part in parts:
            size += len(part)
            budget.check(size, "captured output")
            collected.append(part)
        budget.charge(size)
        return "".join(collected)

    def guard_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """What every ``{% for %}`` iterates: one step per item."""
        budget = _budget()
        for item in iterable:
            budget.step()
            yield item

    @staticmethod
    @pass_context
    def guard_join(context: Context, *parts: Any) -> str:
        """The ``~`` operator, refused before joining when the result would be too long."""
        limit = _budget().limits.output_chars
        if sum(_weight(part, limit) for part in parts) > limit:
            _too_big("a ~ concatenation", limit)
        return markup_join(parts) if context.eval_ctx.autoescape else str_join(parts)

    @staticmethod
    def guard_literal(value: Any) -> Any:
        """A list, tuple or dict literal; ``call()`` checks its size."""
        return value


@lru_cache(maxsize=4)
def _environment(autoescape: bool, placeholders: bool) -> _Sandbox:
    return _Sandbox(autoescape=autoescape, placeholders=placeholders)


@lru_cache(maxsize=256)
def _compiled(source: str, autoescape: bool, placeholders: bool) -> Template:
    return _environment(autoescape, placeholders).from_string(source)


# ---------------------------------------------------------------- rendering


def _template_line(exc: BaseException) -> int | None:
    """The template line an error was raised on: the last template frame of its traceback."""
    if isinstance(exc, TemplateSyntaxError):
        return exc.lineno
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(part: str, exc: BaseException) -> str:
    if isinstance(exc, _LimitError):
        message = f"render budget exceeded: {exc}"
    elif isinstance(exc, RecursionError):
        message = "nested too deeply"
    elif isinstance(exc, MemoryError):
        message = "out of memory"
    elif isinstance(exc, TemplateSyntaxError):
        message = exc.message or "syntax error"
    elif isinstance(exc, SyntaxError):  # Python refused the compiled code (e.g. blocks nested over 20 deep)
        message = f"too complex: {exc.msg}"
    elif isinstance(exc, TemplateError | ArithmeticError | TypeError | ValueError | LookupError):
        message = str(exc) or type(exc).__name__
    else:
        message = type(exc).__name__
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 1] + "…"
    line = _template_line(exc)
    return f"{part}: line {line}: {message}" if line else f"{part}: {message}"


def _compile(part: str, source: str, *, placeholders: bool, limits: RenderLimits) -> Template:
    if len(source) > limits.source_chars:
        raise RenderError(f"{part}: longer than {limits.source_chars} characters", field=part)
    try:
        return _compiled(source, part == "html", placeholders)
    except Exception as exc:
        raise RenderError(_describe(part, exc), field=part) from exc


def _render(part: str, source: str, context: Mapping[str, Any], *, placeholders: bool, limits: RenderLimits) -> str:
    template = _compile(part, source, placeholders=placeholders, limits=limits)
    budget = _Budget(limits, deadline=time.thread_time() + limits.time_ms / 1000)
    token = _BUDGET.set(budget)
    chunks = cast(Generator[str, None, None], template.generate(dict(context)))
    try:
        out: list[str] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            budget.check(size, "the output")
            out.append(chunk)
        return "".join(out)
    except Exception as exc:
        raise RenderError(_describe(part, exc), field=part) from exc
    finally:
        chunks.close()
        _BUDGET.reset(token)


def render(*, part: str, source: str, context: Mapping[str, Any], limits: RenderLimits = DEFAULT_LIMITS) -> str:
    """``source`` rendered with ``context`` (strict: an undefined variable is an error).

    ``part`` (subject, text, html, body) names the part in errors and turns autoescape on for
    ``html``. Raises ``RenderError`` with the part as ``field`` and the line in the message.
    """
    if part not in PART_NAMES:
        raise RenderError(f"part: must be one of {', '.join(PART_NAMES)}, got {part!r}", field="part")
    return _render(part, source, context, placeholders=False, limits=limits)


def template_context(
    *, data: Mapping[str, Any], event: Mapping[str, Any] | None = None, recipient: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The variables a template sees: ``data`` (the event's data), ``event`` (``id``, ``type``,
    ``subject``, ``created_at``) and, when the message has one, ``recipient`` (``id``, the
    tenant's own id for the person, ``locale``, ``timezone``): ``lookup.event_variables`` and
    ``lookup.recipient_variables`` build the last two from rows."""
    context: dict[str, Any] = {"data": dict(data)}
    if event is not None:
        context["event"] = dict(event)
    if recipient is not None:
        context["recipient"] = dict(recipient)
    return context


_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def one_line(text: str) -> str:
    """A header-safe single line: line breaks and control characters become one space."""
    return _LINE_BREAKS.sub(" ", text).strip()


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_body(rendered: str, *, part: str = "body") -> dict[str, Any]:
    """A rendered webhook body as a JSON object, or ``RenderError`` saying why it is not one."""
    try:
        value = json.loads(rendered, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RenderError(
            f"{part}: the rendered body is not valid JSON ({detail}); "
            "insert values with the tojson filter, e.g. {{ data.name | tojson }}",
            field=part,
        ) from exc
    if not isinstance(value, dict):
        raise RenderError(f"{part}: must render to a JSON object, got {type(value).__name__}", field=part)
    return value


def render_message(
    template_parts: Mapping[str, str | None], context: Mapping[str, Any], *, limits: RenderLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Every part of a template (``{"channel": …, "subject": …, …}``) rendered for its channel.

    email -> ``{subject, text, html}`` (subject on one line, html ``None`` when absent);
    sms -> ``{text}`` (trimmed, never empty); webhook -> ``{body}`` (a parsed JSON object).
    """
    channel = template_parts.get("channel")
    spec = CHANNEL_PARTS.get(channel) if isinstance(channel, str) else None
    if spec is None:
        raise RenderError(f"channel: must be one of {', '.join(CHANNEL_PARTS)}, got {channel!r}", field="channel")
    out: dict[str, Any] = {}
    for name in spec.allowed:
        source = template_parts.get(name)
        if source is None:
            if name in spec.required:
                raise RenderError(f"{name}: the {channel} template has no {name}", field=name)
            out[name] = None
            continue
        out[name] = render(part=name, source=source, context=context, limits=limits)
    if channel == "email":
        out["subject"] = one_line(out["subject"])
    elif channel == "sms":
        out["text"] = out["text"].strip()
        if not out["text"]:
            raise RenderError("text: the SMS rendered empty", field="text")
    else:
        out["body"] = parse_body(out["body"])
    return out


def validate_template(
    *,
    channel: str,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    body: str | None = None,
    sample_data: Mapping[str, Any] | None = None,
    limits: RenderLimits = DEFAULT_LIMITS,
) -> dict[str, str]:
    """Check a template before it is stored; raise ``ValidationError`` naming every bad part.

    The channel's parts must be present (email: subject and text, html optional; sms: text;
    webhook: body) and no others. Each part must compile and survive a sample render with
    ``sample_data`` as ``data`` (missing variables are placeholders, see the module docstring),
    and a webhook body must come out as a JSON object. Returns the sample render of each part.
    """
    sources = {"subject": subject, "text": text, "html": html, "body": body}
    check_parts(channel=channel, parts=sources)
    context = {} if sample_data is None else {"data": dict(sample_data)}
    errors: list[dict[str, str]] = []
    samples: dict[str, str] = {}
    for name, source in sources.items():
        if source is None:
            continue
        try:
            samples[name] = _render(name, source, context, placeholders=True, limits=limits)
            if name == "body":
                parse_body(samples[name])
        except RenderError as exc:
            errors.append({"field": name, "message": exc.message})
    if errors:
        raise ValidationError(errors[0]["message"], field=errors[0]["field"], errors=errors)
    return samples


def check_parts(*, channel: str, parts: Mapping[str, str | None]) -> None:
    """``ValidationError`` unless ``parts`` has every part the channel requires and no other."""
    spec = CHANNEL_PARTS.get(channel)
    if spec is None:
        raise ValidationError(f"channel: must be one of {', '.join(CHANNEL_PARTS)}, got {channel!r}", field="channel")
    errors: list[dict[str, str]] = []
    for name in PART_NAMES:
        source = parts.get(name)
        if source is None and name in spec.required:
            errors.append({"field": name, "message": f"{name}: required for {channel} templates"})
        elif source is not None and name not in spec.allowed:
            errors.append({"field": name, "message": f"{name}: not used by {channel} templates"})
    if errors:
        raise ValidationError(errors[0]["message"], field=errors[0]["field"], errors=errors)
