"""spooled content

Small instances are spooled inside the index: their bytes are committed in the same
transaction as their ``instance`` row instead of being written, flushed and renamed into
the spool directory (one flush per acknowledged instance instead of three). On
PostgreSQL the column is stored out of line without compression: DICOM pixel data is
mostly incompressible or compressed already, and trying costs the server CPU.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'spooled_content',
        sa.Column('instance_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  autoincrement=False, nullable=False),
        sa.Column('content', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ['instance_pk'], ['instance.id'], name=op.f('fk_spooled_content_instance_pk_instance')
        ),
        sa.PrimaryKeyConstraint('instance_pk', name=op.f('pk_spooled_content')),
    )
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE spooled_content ALTER COLUMN content SET STORAGE EXTERNAL')


def downgrade() -> None:
    op.drop_table('spooled_content')
