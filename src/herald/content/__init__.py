"""What a message says: tenants' templates rendered safely, locale fallback, SMS segmentation.

``render`` holds the sandbox and its budgets, ``lookup`` finds the template for a locale, ``sms``
counts SMS length, encoding and segments.
"""

from __future__ import annotations

from herald.content.lookup import (
    event_variables,
    locale_chain,
    normalize_locale,
    recipient_variables,
    resolve_template,
    template_parts,
)
from herald.content.render import (
    CHANNEL_PARTS,
    DEFAULT_LIMITS,
    RenderError,
    RenderLimits,
    render,
    render_message,
    template_context,
    validate_template,
)
from herald.content.sms import SmsInfo, sms_info

__all__ = [
    "CHANNEL_PARTS",
    "DEFAULT_LIMITS",
    "RenderError",
    "RenderLimits",
    "SmsInfo",
    "event_variables",
    "locale_chain",
    "normalize_locale",
    "recipient_variables",
    "render",
    "render_message",
    "resolve_template",
    "sms_info",
    "template_context",
    "template_parts",
    "validate_template",
]
