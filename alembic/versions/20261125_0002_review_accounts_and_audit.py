"""review accounts and audit

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The audit log is append-only: the database itself refuses to change or remove its rows.
AUDIT_APPEND_ONLY = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"""


def upgrade() -> None:
    op.create_table(
        "reviewers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column(
            "role",
            sa.Enum("reviewer", "lead", "admin", name="reviewer_role", native_enum=False, length=20),
            nullable=False,
        ),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviewers")),
        sa.UniqueConstraint("email", name=op.f("uq_reviewers_email")),
    )
    op.create_table(
        "reviewer_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("reviewer_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_agent", sa.String(length=400), nullable=True),
        sa.ForeignKeyConstraint(
            ["reviewer_id"],
            ["reviewers.id"],
            name=op.f("fk_reviewer_sessions_reviewer_id_reviewers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviewer_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_reviewer_sessions_token_hash")),
    )
    op.create_index(
        op.f("ix_reviewer_sessions_reviewer_id"), "reviewer_sessions", ["reviewer_id"], unique=False
    )
    op.create_table(
        "reviewer_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("reviewer_id", sa.Uuid(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["reviewer_id"],
            ["reviewers.id"],
            name=op.f("fk_reviewer_tokens_reviewer_id_reviewers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviewer_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_reviewer_tokens_token_hash")),
    )
    op.create_index(op.f("ix_reviewer_tokens_reviewer_id"), "reviewer_tokens", ["reviewer_id"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("actor", sa.String(length=400), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject_type", sa.String(length=64), nullable=False),
        sa.Column("subject_id", sa.String(length=200), nullable=False),
        sa.Column("submission_id", sa.Uuid(), nullable=True),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("before", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("after", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"], unique=False)
    op.create_index("ix_audit_log_actor", "audit_log", ["actor", "at"], unique=False)
    op.create_index("ix_audit_log_subject", "audit_log", ["subject_type", "subject_id", "at"], unique=False)
    op.create_index("ix_audit_log_submission_id", "audit_log", ["submission_id", "at"], unique=False)
    op.execute(AUDIT_APPEND_ONLY)

    op.add_column(
        "review_items",
        sa.Column(
            "kind",
            sa.Enum("review", "appeal", "qa", name="review_kind", native_enum=False, length=20),
            server_default="review",
            nullable=False,
        ),
    )
    op.add_column(
        "review_items", sa.Column("escalated", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )
    op.add_column("review_items", sa.Column("origin_id", sa.Uuid(), nullable=True))
    op.add_column("review_items", sa.Column("assigned_to", sa.String(length=320), nullable=True))
    op.add_column(
        "review_items",
        sa.Column(
            "excluded_reviewers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )
    op.create_foreign_key(
        op.f("fk_review_items_origin_id_review_items"),
        "review_items",
        "review_items",
        ["origin_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index(op.f("ix_review_items_origin_id"), "review_items", ["origin_id"], unique=False)
    op.create_index(op.f("ix_review_items_assigned_to"), "review_items", ["assigned_to"], unique=False)
    op.create_index(
        "ix_review_items_decided",
        "review_items",
        ["decided_at"],
        unique=False,
        postgresql_where=sa.text("state = 'decided'"),
    )
    # Items escalated before this revision kept the flag in details only.
    op.execute(
        "UPDATE review_items SET escalated = true WHERE state = 'escalated' OR details->>'escalated' = 'true'"
    )


def downgrade() -> None:
    op.drop_index(
        "ix_review_items_decided", table_name="review_items", postgresql_where=sa.text("state = 'decided'")
    )
    op.drop_index(op.f("ix_review_items_assigned_to"), table_name="review_items")
    op.drop_index(op.f("ix_review_items_origin_id"), table_name="review_items")
    op.drop_constraint(op.f("fk_review_items_origin_id_review_items"), "review_items", type_="foreignkey")
    op.drop_column("review_items", "excluded_reviewers")
    op.drop_column("review_items", "assigned_to")
    op.drop_column("review_items", "origin_id")
    op.drop_column("review_items", "escalated")
    op.drop_column("review_items", "kind")

    op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
    op.execute("DROP TRIGGER IF EXISTS audit_log_no_update_delete ON audit_log")
    op.drop_index("ix_audit_log_submission_id", table_name="audit_log")
    op.drop_index("ix_audit_log_subject", table_name="audit_log")
    op.drop_index("ix_audit_log_actor", table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_at"), table_name="audit_log")
    op.drop_table("audit_log")
    op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")

    op.drop_index(op.f("ix_reviewer_tokens_reviewer_id"), table_name="reviewer_tokens")
    op.drop_table("reviewer_tokens")
    op.drop_index(op.f("ix_reviewer_sessions_reviewer_id"), table_name="reviewer_sessions")
    op.drop_table("reviewer_sessions")
    op.drop_table("reviewers")
