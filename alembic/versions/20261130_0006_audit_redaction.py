"""audit log: erasure may redact the free text of an erased submission's entries, and nothing else

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 23:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Still append-only, with one narrow exception for erasure: inside a transaction that set
# moderation.audit_redaction (SET LOCAL, as erasure does), an entry about an erased submission may have
# the free text of its snapshots (note, reason, appeal_reason) replaced by '(erased)'; nothing else.
REDACTABLE = """
CREATE OR REPLACE FUNCTION audit_snapshot_redacted(old_value jsonb, new_value jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN old_value IS NOT DISTINCT FROM new_value THEN true
        WHEN jsonb_typeof(old_value) IS DISTINCT FROM 'object'
            OR jsonb_typeof(new_value) IS DISTINCT FROM 'object' THEN false
        ELSE (old_value - 'note' - 'reason' - 'appeal_reason') = (new_value - 'note' - 'reason' - 'appeal_reason')
            AND (
                SELECT bool_and(
                    new_value -> k IS NOT DISTINCT FROM old_value -> k OR new_value -> k = '"(erased)"'::jsonb
                )
                FROM unnest(ARRAY['note', 'reason', 'appeal_reason']) AS k
            )
    END
$$;

CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
        AND current_setting('moderation.audit_redaction', true) = 'on'
        AND (to_jsonb(NEW) - 'before' - 'after') = (to_jsonb(OLD) - 'before' - 'after')
        AND EXISTS (SELECT 1 FROM submissions s WHERE s.id = OLD.submission_id AND s.erased_at IS NOT NULL)
        AND audit_snapshot_redacted(OLD.before, NEW.before)
        AND audit_snapshot_redacted(OLD.after, NEW.after)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
"""

APPEND_ONLY = """
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
"""


def upgrade() -> None:
    op.execute(REDACTABLE)


def downgrade() -> None:
    op.execute(APPEND_ONLY)
    op.execute("DROP FUNCTION IF EXISTS audit_snapshot_redacted(jsonb, jsonb)")
