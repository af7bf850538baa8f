"""deliveries in flight: a partial index on lane where a lease is held

The dispatcher counts a lane's deliveries in flight to keep under its cap. Without this index
the count walked every delivery the lane ever had (finished ones included) through
``ix_deliveries_due``; this one holds only the rows a lease is out on.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_HELD = sa.text("lease_until IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_deliveries_in_flight", "deliveries", ["lane"], sqlite_where=_HELD, postgresql_where=_HELD)


def downgrade() -> None:
    op.drop_index("ix_deliveries_in_flight", table_name="deliveries")
