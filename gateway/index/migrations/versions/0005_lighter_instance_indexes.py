"""lighter instance indexes

Every index on ``instance`` is written for every received instance. Two paid for nothing:
the full index on ``sop_instance_uid`` (every lookup is of the current version, which the
partial unique index serves) and the one on ``association_id`` (nothing looks instances
up by association). The index on ``routed`` becomes a partial one holding only the
unrouted rows that the unrouted count reads.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 05:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_sop_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_instance_association_id'))
        batch_op.drop_index(batch_op.f('ix_instance_routed'))
        batch_op.create_index(
            'ix_instance_unrouted', ['routed'], unique=False,
            sqlite_where=sa.text('routed IS 0'), postgresql_where=sa.text('routed IS false'),
        )


def downgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_unrouted')
        batch_op.create_index(batch_op.f('ix_instance_routed'), ['routed'], unique=False)
        batch_op.create_index(
            batch_op.f('ix_instance_association_id'), ['association_id'], unique=False)
        batch_op.create_index(
            batch_op.f('ix_instance_sop_instance_uid'), ['sop_instance_uid'], unique=False)
