"""Template rendering: an injection corpus that must fail safely, budgets, undefined variables,
the parts of each channel, and the locale fallback chain."""

from __future__ import annotations

import itertools
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.content.lookup import locale_chain, normalize_locale
from herald.content.render import (
    RenderError,
    RenderLimits,
    render,
    render_message,
    template_context,
    validate_template,
)
from herald.errors import ValidationError
from tests.strategies import locale_tags

CANARY = "canary-7f3e9d2b-not-for-templates"


@pytest.fixture(autouse=True)
def _canary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A secret in the environment and in a file: no template may ever show either."""
    monkeypatch.setenv("HERALD_CANARY_SECRET", CANARY)
    monkeypatch.setenv("CANARY_SECRET", CANARY)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(CANARY)
    return secret_file


CONTEXT: dict[str, Any] = {"x": 1, "data": {"name": "Ana", "items": [1, 2, 3]}}
LEAKS = (CANARY, "root:", "/bin/", "uid=", "HERALD_", "PATH=", "Popen", "<module", "__builtins__")


def assert_no_leak(text: str) -> None:
    for marker in LEAKS:
        assert marker not in text, f"{marker!r} leaked: {text[:200]!r}"


def outcome(source: str, *, part: str = "text", validate: bool = False) -> str:
    """What a render (or an upload check) gave: its output, or the refusal's message prefixed with '!'."""
    try:
        if validate:
            validate_template(channel="sms", text=source)
            return ""
        return render(part=part, source=source, context=CONTEXT)
    except (RenderError, ValidationError) as exc:
        assert exc.field == part
        return "!" + exc.message


# (template, a fragment the refusal must contain (or a tuple of them, any one will do), whether the upload
# check refuses it too).
# Variables that simply do not exist (config, request) are placeholders at upload, so pass there.
CORPUS = [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe", True),
    ("{{ ().__class__.__bases__[0].__subclasses__() }}", "unsafe", True),
    ("{{ x.__class__.__base__.__subclasses__() }}", "unsafe", True),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "unsafe", True),
    ("{{ joiner.__init__.__globals__['os'].environ }}", "unsafe", True),
    ("{{ namespace.__init__.__globals__.__builtins__ }}", "unsafe", True),
    ("{{ range.__globals__ }}", "unsafe", True),
    ("{{ self._TemplateReference__context }}", "unsafe", True),
    ("{{ self.__init__.__globals__ }}", "unsafe", True),
    ("{{ config }}", "'config' is undefined", False),
    ("{{ config.items() }}", "'config' is undefined", False),
    ("{{ request }}", "'request' is undefined", False),
    ("{{ request.application.__globals__.__builtins__.open('/etc/passwd').read() }}", "", True),
    ("{{ lipsum.__globals__ }}", "", True),
    ("{{ lipsum(100000, min=1000) }}", "'lipsum' is undefined", False),
    ("{{ x|attr('__class__') }}", "unsafe", True),
    ("{{ x['__class__'] }}", "unsafe", True),
    ("{{ ''['__class__']['__mro__'] }}", "unsafe", True),
    ("{{ '{0.__class__}'.format(x) }}", "unsafe", True),
    ("{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}", "unsafe", True),
    ("{{ '{0[__class__]}'.format(x) }}", "unsafe", True),
    ("{{ '{0:{1}}'.format(x, 999999999) }}", "nested fields", True),
    ("{{ '%*d' % (999999999, 1) }}", "'*' widths", True),
    ("{{ [].append(1) }}", "unsafe", True),
    ("{% set d = {} %}{{ d.update(a=1) }}", "unsafe", True),
    ("{{ data.pop('name') }}", "unsafe", False),
    ("{{ dict.mro() }}", "unsafe", True),
    ("{{ cycler.mro() }}", "unsafe", True),
    ("{{ cycler.func_globals }}", "func_globals", False),
    ("{{ (range(3)|map('string')).gi_frame }}", "unsafe", True),
    ("{{ (range(3)|map('string')).gi_code }}", "unsafe", True),
    ("{{ 'x'.translate({120: 'y'}) }}", "not allowed", True),
    ("{% include '/etc/passwd' %}", "include", True),
    ("{% include 'SECRET_FILE' %}", "include", True),
    ("{% import 'macros.html' as m %}", "import", True),
    ("{% from 'macros.html' import m %}", "import", True),
    ("{% extends 'base.html' %}", "extends", True),
    # time
    ("{% for x in range(100000) %}{% for y in range(100000) %}{% endfor %}{% endfor %}", "budget", True),
    ("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}", "budget", True),
    ("{% for i in range(1000000) %}{% endfor %}", "Range too big", True),
    # Unbounded recursion: the recursion limit or, on a loaded machine, the time budget stops it first.
    ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", ("nested too deeply", "render budget"), True),
    ("{% for a in [1] recursive %}{{ loop([1]) }}{% endfor %}", "nested too deeply", True),
    # size: refused before allocating
    ("{{ 'a' * 100000000 }}", "budget", True),
    ("{{ ['a'] * 100000000 }}", "budget", True),
    ("{{ 'a' * 200000 ~ 'b' * 200000 }}", "budget", True),
    ("{{ 'a' * 200000 + 'b' * 200000 }}", "budget", True),
    ("{{ 9 ** (9 ** 9) }}", "budget", True),
    ("{{ 10 ** 5000 * 10 ** 5000 }}", "budget", True),
    ("{{ '%0999999999d' % 1 }}", "budget", True),
    ("{{ '%0999999999d' is odd }}", "budget", True),
    ("{{ ['%0999999999d']|select('divisibleby', 3)|list }}", "budget", True),
    ("{{ '%.999999999f'|format(1) }}", "budget", True),
    ("{{ '{:>999999999}'.format('a') }}", "budget", True),
    ("{{ 'a'|center(999999999) }}", "budget", True),
    ("{{ 'a'.ljust(999999999) }}", "budget", True),
    ("{{ 'a\\t'.expandtabs(999999999) }}", "budget", True),
    ("{{ 'a\\nb'|indent(999999999) }}", "budget", True),
    ("{{ 'a b c'|wordwrap(1, wrapstring='x' * 200000) }}", "budget", True),
    ("{{ 'ab'|replace('', 'x' * 200000) }}", "budget", True),
    ("{{ 'ab'.replace('', 'x' * 200000) }}", "budget", True),
    ("{{ range(100000)|join('x' * 100) }}", "budget", True),
    ("{{ ('x' * 100000).join(range(10)|map('string')) }}", "budget", True),
    ("{{ range(10)|batch(999999999)|list }}", "budget", True),
    ("{{ range(10)|slice(999999999)|list }}", "budget", True),
    ("{{ range(100000)|batch(1)|sum(start=[]) }}", "only numbers", True),
    ("{{ 1|round(-999999999, 'floor') }}", "precision", True),
    ("{{ x.to_bytes(999999999, 'big') }}", "budget", False),
    ("{{ data|tojson(indent=999999999) }}", "indent", True),
    ("{% set a = 'x' * 200000 %}{% set b = [a, a] %}{{ b }}", "budget", True),
    ("{% set a = 'x' * 200000 %}{{ {'k': a, 'l': a} }}", "budget", True),
    (
        "{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}",
        "budget",
        True,
    ),
    ("{% set x %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}{{ x|length }}", "budget", True),
    ("{% macro m() %}{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}{% endmacro %}{{ m() }}", "budget", True),
    ("{% for i in range(100000) %}{{ 'z' * 100 }}{% endfor %}", "budget", True),
    ("{% for i in range(100000) %}zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz{% endfor %}", "budget", True),
    # nesting: values (hashing or printing them recurses in C) and the template itself
    (
        "{% set ns = namespace(t=()) %}{% for i in range(99999) %}{% set ns.t = (ns.t,) %}{% endfor %}{{ {ns.t: 1} }}",
        "deeper",
        True,
    ),
    ("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", "deeper", True),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nested too deeply", True),
    ("{{ " + "[" * 5000 + "]" * 5000 + " }}", "nested too deeply", True),
    ("{% for a in [1] %}" * 30 + "{% endfor %}" * 30, "too complex", True),
    ("{{ x.y }}" * 5100, "too complex", True),
    # plain runtime errors
    ("line one\n{{ 1 / 0 }}", "line 2: division by zero", True),
    ("{{ x + 'a' }}", "unsupported operand", False),
]


@pytest.mark.parametrize(
    ("source", "refusal", "refused_at_upload"),
    [pytest.param(*case, id=f"{n:02d}-{case[0][:40]}") for n, case in enumerate(CORPUS)],
)
def test_injection_corpus_fails_safely(
    source: str, refusal: str | tuple[str, ...], refused_at_upload: bool, _canary: Path
) -> None:
    refusals = refusal if isinstance(refusal, tuple) else (refusal,)
    source = source.replace("SECRET_FILE", str(_canary))
    started = time.monotonic()
    for part in ("text", "html"):
        rendered = outcome(source, part=part)
        assert rendered.startswith("!"), f"rendered: {rendered[:200]!r}"
        assert any(r in rendered for r in refusals), rendered
        assert_no_leak(rendered)
    uploaded = outcome(source, validate=True)
    assert uploaded.startswith("!") == refused_at_upload, uploaded
    assert_no_leak(uploaded)
    # Each of the three tries stops within its 200 ms budget (plus compiling and unwinding).
    assert time.monotonic() - started < 20  # a runaway, unstopped, would take hours


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 100000000 }}",
        "{{ ['a' * 1000] * 1000000 }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ 'ab'.replace('', 'x' * 250000) }}",
        "{% set ns = namespace(x=['y' * 1000]) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}",
        "{% set x %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}",
    ],
)
def test_size_caps_stop_before_allocating(source: str) -> None:
    tracemalloc.start()
    try:
        assert outcome(source).startswith("!")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, f"peaked at {peak / 2**20:.0f} MiB"


def test_the_time_budget_counts_the_renders_cpu_not_its_wait_for_the_cpu() -> None:
    """On a busy machine a render waits for the CPU; that is no work of the template's and must
    not fail a drop's line or an API request. Here another thread holds the GIL (one long C call)
    for several times the budget while a render runs: the render still succeeds."""
    go = threading.Event()
    source = "{{ start() }}{% for a in range(100000) %}{% endfor %}done"  # ~25 ms of CPU here

    def start() -> str:
        go.set()
        return ""

    def hold_the_gil() -> None:
        go.wait()
        sum(range(30_000_000))  # ~0.45 s here, never giving the GIL up

    holder = threading.Thread(target=hold_the_gil)
    holder.start()
    began = time.monotonic()
    try:
        assert render(part="text", source=source, context={"start": start}, limits=RenderLimits(time_ms=100)) == "done"
    finally:
        holder.join()
    assert time.monotonic() - began > 0.1  # it did wait longer than its budget


def test_time_budget_is_a_setting() -> None:
    slow = "{% for a in range(100000) %}{% for b in range(100) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(RenderError, match=r"took more than 20 ms of CPU|more than 1000 steps"):
        render(part="text", source=slow, context={}, limits=RenderLimits(time_ms=20, steps=1000))
    assert time.monotonic() - started < 10
    with pytest.raises(RenderError, match="more than 1000 steps"):
        render(part="text", source=slow, context={}, limits=RenderLimits(steps=1000))
    # A failed render leaves nothing behind: the next one has its whole budget.
    assert render(part="text", source="{% for i in range(5000) %}.{% endfor %}", context={}) == "." * 5000


def test_templates_render_in_other_threads() -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: render(part="text", source="{{ n * 2 }}", context={"n": n}), range(20)))
    assert results == [str(n * 2) for n in range(20)]


def test_html_autoescapes_data_and_other_parts_do_not() -> None:
    context = {"data": {"name": "<script>alert('x')</script> & co"}}
    html = render(part="html", source="<p>{{ data.name }}</p>", context=context)
    assert html == "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</p>"
    assert render(part="html", source="{{ '<b>'|safe ~ data.name }}", context=context).startswith("<b>&lt;script")
    assert render(part="text", source="{{ data.name }}", context=context) == context["data"]["name"]


def test_undefined_variables_fail_at_send_and_are_placeholders_at_upload() -> None:
    source = "Hello {{ data.name }},\nyour code is {{ data.code }}."
    with pytest.raises(RenderError) as caught:
        render(part="text", source=source, context={"data": {"name": "Ana"}})
    assert caught.value.field == "text"
    assert caught.value.message == "text: line 2: 'dict object' has no attribute 'code'"
    assert render(part="text", source=source, context={"data": {"name": "Ana", "code": 7}}) == (
        "Hello Ana,\nyour code is 7."
    )
    # Optional values: default and `is defined` work with strict variables.
    optional = "{{ data.nick | default('friend') }}{% if data.vip is defined %}!{% endif %}"
    assert render(part="text", source=optional, context={"data": {}}) == "friend"
    # At upload nothing is known: chains, calls, arithmetic, formats and loops on placeholders pass.
    validate_template(
        channel="email",
        subject="{{ data.order.id }} {{ recipient.name.upper() }}",
        text="{{ '%.2f' | format(data.total / 100) }} {{ '{:,}'.format(data.n) }} {{ data.n | round(2) }}"
        "{% for i in data.items %}{{ i.sku }}{% endfor %}{% if data.count > 1 %}s{% endif %}{{ data['_id'] }}",
    )


def test_upload_check_names_each_bad_part_with_its_line() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_template(
            channel="email",
            subject="{{ 1 / 0 }}",
            text="Hello\n{{ name }\n",
            html="<p>\n\n{% for %}</p>",
        )
    assert caught.value.errors == [
        {"field": "subject", "message": "subject: line 1: division by zero"},
        {"field": "text", "message": "text: line 2: unexpected '}'"},
        {"field": "html", "message": "html: line 3: Expected an expression, got 'end of statement block'"},
    ]
    assert caught.value.field == "subject"


@pytest.mark.parametrize(
    ("channel", "parts", "field", "message"),
    [
        ("email", {"text": "t"}, "subject", "subject: required for email templates"),
        ("email", {"subject": "s"}, "text", "text: required for email templates"),
        ("email", {"subject": "s", "text": "t", "body": "{}"}, "body", "body: not used by email templates"),
        ("sms", {"text": "t", "html": "<p>"}, "html", "html: not used by sms templates"),
        ("sms", {}, "text", "text: required for sms templates"),
        ("webhook", {"text": "t"}, "body", "body: required for webhook templates"),
        ("fax", {"text": "t"}, "channel", "channel: must be one of email, sms, webhook, got 'fax'"),
        ("webhook", {"body": "[1, 2]"}, "body", "body: must render to a JSON object, got list"),
        ("webhook", {"body": '{"a": 1,}'}, "body", "body: the rendered body is not valid JSON"),
    ],
)
def test_upload_check_knows_each_channels_parts(channel: str, parts: dict[str, str], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_template(channel=channel, **parts)
    assert any(e["field"] == field and e["message"].startswith(message) for e in caught.value.errors)


def test_sample_data_checks_a_webhook_body_with_real_values() -> None:
    body = '{"name": {{ data.name }}}'
    validate_template(channel="webhook", body=body)  # the placeholder renders as 0
    with pytest.raises(ValidationError, match="not valid JSON"):
        validate_template(channel="webhook", body=body, sample_data={"name": "Ana"})
    validate_template(channel="webhook", body='{"name": {{ data.name | tojson }}}', sample_data={"name": "Ana"})
    validate_template(channel="webhook", body='{"name": {{ data.name | tojson }}}')


def test_email_message() -> None:
    parts = {
        "channel": "email",
        "subject": "Ticket {{ event.subject }}\r\nBcc: all@example.com\n",
        "text": "Hi {{ recipient.id }}: {{ data.status }}\n",
        "html": "<p>{{ data.status }}</p>",
    }
    context = template_context(
        data={"status": "<b>escalated</b>"},
        event={"id": "evt_1", "type": "ticket.escalated", "subject": "ticket:4711"},
        recipient={"id": "u-1"},
    )
    assert render_message(parts, context) == {
        "subject": "Ticket ticket:4711 Bcc: all@example.com",
        "text": "Hi u-1: <b>escalated</b>",
        "html": "<p>&lt;b&gt;escalated&lt;/b&gt;</p>",
    }
    assert render_message({**parts, "html": None}, context)["html"] is None


def test_sms_message_is_trimmed_and_never_empty() -> None:
    parts = {"channel": "sms", "text": "  Your code is {{ data.code }}\n\n"}
    assert render_message(parts, template_context(data={"code": "123456"})) == {"text": "Your code is 123456"}
    with pytest.raises(RenderError, match="text: the SMS rendered empty"):
        render_message({"channel": "sms", "text": "{{ data.code }} "}, template_context(data={"code": None}))


def test_webhook_message_is_a_json_object() -> None:
    parts = {"channel": "webhook", "body": '{"type": {{ event.type | tojson }}, "data": {{ data | tojson }}}'}
    data = {"name": 'Ana "the" <admin>', "n": [1, 2.5, None]}
    context = template_context(data=data, event={"type": "ticket.created"})
    assert render_message(parts, context) == {"body": {"type": "ticket.created", "data": data}}
    with pytest.raises(RenderError) as caught:
        render_message({"channel": "webhook", "body": '{"name": "{{ data.name }}"}'}, context)
    assert caught.value.field == "body"
    assert "tojson" in caught.value.message
    with pytest.raises(RenderError, match="got int"):
        render_message({"channel": "webhook", "body": "{{ data.n | length }}"}, context)
    with pytest.raises(RenderError, match="NaN is not JSON"):
        render_message({"channel": "webhook", "body": '{"x": NaN}'}, context)


def test_a_template_missing_a_part_its_channel_needs_cannot_render() -> None:
    with pytest.raises(RenderError) as caught:
        render_message({"channel": "email", "subject": "s", "text": None}, template_context(data={}))
    assert (caught.value.field, caught.value.message) == ("text", "text: the email template has no text")
    with pytest.raises(RenderError) as caught:
        render_message({"channel": "pigeon"}, {})
    assert caught.value.field == "channel"


def test_legitimate_templates_fit_the_budget() -> None:
    """A large receipt stays inside the step and size budgets. The wall-clock cap is lifted here:
    it depends on how busy the machine is, and timing belongs in bench/, not in unit tests."""
    rows = [{"sku": f"SKU-{i}", "qty": i % 7, "price": i * 101} for i in range(2000)]
    source = (
        "{% macro money(cents) %}{{ '%.2f' | format(cents / 100) }}{% endmacro %}"
        "{% for row in data.rows %}{{ loop.index }}. {{ row.sku | upper }} x{{ row.qty }} {{ money(row.price) }}\n"
        "{% endfor %}Total: {{ money(data.rows | sum(attribute='price')) }}"
    )
    limits = RenderLimits(time_ms=60_000)
    out = render(part="text", source=source, context={"data": {"rows": rows}}, limits=limits)
    assert out.endswith(f"Total: {sum(r['price'] for r in rows) / 100:.2f}")
    assert out.count("\n") == 2000


# ---------------------------------------------------------------- locales


@pytest.mark.parametrize(
    ("locale", "chain"),
    [
        ("pt-BR", ["pt-BR", "pt", ""]),
        ("pt-br", ["pt-BR", "pt", ""]),
        ("PT_br", ["pt-BR", "pt", ""]),
        ("pt_BR.UTF-8", ["pt-BR", "pt", ""]),
        ("pt", ["pt", ""]),
        ("zh-hant-tw", ["zh-Hant-TW", "zh-Hant", "zh", ""]),
        ("es-419", ["es-419", "es", ""]),
        ("en-US-u-ca-gregory", ["en-US", "en", ""]),
        ("de-DE-1996", ["de-DE-1996", "de-DE", "de", ""]),
        ("", [""]),
        (None, [""]),
        ("default", [""]),
        ("x", [""]),
        ("123", [""]),
        ("pt-", [""]),
        ("pt-BR-", [""]),
        ("pt--BR", [""]),
        ("en-US\x00", [""]),
    ],
)
def test_locale_chain_examples(locale: str | None, chain: list[str]) -> None:
    assert locale_chain(locale) == chain


@given(tag=locale_tags())
def test_locale_chain_drops_subtags_from_the_end(tag: tuple[str, list[str]]) -> None:
    spelled, subtags = tag
    chain = locale_chain(spelled)
    assert chain == ["-".join(subtags[:n]) for n in range(len(subtags), 0, -1)] + [""]
    assert normalize_locale(spelled) == chain[0]
    assert locale_chain(spelled.swapcase().replace("-", "_")) == chain


@given(text=st.text(max_size=60))
def test_locale_chain_takes_anything(text: str) -> None:
    chain = locale_chain(text)
    assert chain[-1] == ""
    assert all(len(name) <= 35 for name in chain)
    assert all(later == "" or earlier.startswith(later + "-") for earlier, later in itertools.pairwise(chain))


def test_missing_optional_values_are_false_in_conditions_but_never_printed() -> None:
    from herald.content.render import RenderError as _RenderError
    from herald.content.render import render as _render

    source = "{% if data.note %}note: {{ data.note }}{% else %}no note{% endif %}"
    assert _render(part="text", source=source, context={"data": {}}) == "no note"
    assert _render(part="text", source=source, context={"data": {"note": "hi"}}) == "note: hi"
    with pytest.raises(_RenderError, match="note"):
        _render(part="text", source="Your note: {{ data.note }}", context={"data": {}})
