"""deliveries: indexes on mostly-empty columns hold only the rows that set them

``due_at`` is empty once a delivery is claimed, ``lease_until`` once it is finished, and most
rows never set ``schedule_key``, ``recipient_id`` (webhooks) or ``drop_id`` (API events). Their
indexes held an entry for every delivery ever made, written on each insert and moved on each
state change; partial indexes (``WHERE column IS NOT NULL``) hold only the rows that set them.
``ix_events_tenant_id`` goes: ``ix_events_tenant_subject`` starts with ``tenant_id``.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# name -> (columns, the column that must be set)
_PARTIAL = {
    "ix_deliveries_due": (["lane", "due_at"], "due_at"),
    "ix_deliveries_lease": (["lease_until"], "lease_until"),
    "ix_deliveries_schedule_key": (["tenant_id", "schedule_key"], "schedule_key"),
    "ix_deliveries_recipient_id": (["recipient_id"], "recipient_id"),
    "ix_deliveries_drop_id": (["drop_id"], "drop_id"),
}


def upgrade() -> None:
    for name, (columns, column) in _PARTIAL.items():
        condition = sa.text(f"{column} IS NOT NULL")
        op.drop_index(name, table_name="deliveries")
        op.create_index(name, "deliveries", columns, sqlite_where=condition, postgresql_where=condition)
    op.drop_index("ix_events_tenant_id", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_tenant_id", "events", ["tenant_id"])
    for name, (columns, _column) in _PARTIAL.items():
        op.drop_index(name, table_name="deliveries")
        op.create_index(name, "deliveries", columns)
