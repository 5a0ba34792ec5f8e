"""The ``moderation reviewers`` commands: create accounts, set passwords and roles, issue API tokens."""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from typing import Any

from moderation.reviewers.models import Role


def _password(args: argparse.Namespace, *, generate: bool) -> tuple[str, bool]:
    """The new password and whether it was generated (and so must be shown)."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n"), False
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise SystemExit("error: the passwords differ")
        return first, False
    if not generate:
        raise SystemExit("error: give the password on stdin with --password-stdin")
    return secrets.token_urlsafe(15), True


def _create(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.reviewers.service import create_reviewer

    password, generated = _password(args, generate=True)
    with session_scope() as session:
        reviewer = create_reviewer(session, args.email, args.role, password, display_name=args.name or "")
        email, role = reviewer.email, reviewer.role.value
    print(f"reviewer {email} created ({role})")
    if generated:
        print(f"password (shown once, store it now): {password}")
    return 0


def _list(_: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.reviewers.repository import ReviewerRepository

    with session_scope() as session:
        for r in ReviewerRepository(session).list():
            state = "active" if r.active else "disabled"
            locked = f" locked until {r.locked_until:%Y-%m-%d %H:%M}" if r.locked_until else ""
            print(f"{r.email}  {r.role.value}  {state}{locked}  last login {r.last_login_at or 'never'}")
    return 0


def _set_password(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.reviewers.service import get_reviewer, set_password

    password, generated = _password(args, generate=True)
    with session_scope() as session:
        set_password(session, get_reviewer(session, args.email), password, actor="cli")
    print(f"password of {args.email} changed; their sessions ended")
    if generated:
        print(f"password (shown once, store it now): {password}")
    return 0


def _update(args: argparse.Namespace, **changes: Any) -> int:
    from moderation.db import session_scope
    from moderation.reviewers.service import get_reviewer, update_reviewer

    with session_scope() as session:
        reviewer = update_reviewer(session, get_reviewer(session, args.email), actor="cli", **changes)
        summary = f"{reviewer.email}: {reviewer.role.value}, {'active' if reviewer.active else 'disabled'}"
    print(summary)
    return 0


def _issue_token(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.reviewers.service import get_reviewer, issue_token

    with session_scope() as session:
        token = issue_token(session, get_reviewer(session, args.email), label=args.label, actor="cli")
    print(token)
    return 0


def add_reviewer_commands(sub: Any) -> None:
    """Add the ``reviewers`` command group to the ``moderation`` parser."""
    reviewers = sub.add_parser("reviewers", help="manage reviewer accounts").add_subparsers(
        dest="reviewers_command", required=True
    )
    roles = [r.value for r in Role]
    create = reviewers.add_parser("create", help="create a reviewer account")
    create.add_argument("email")
    create.add_argument("--role", choices=roles, default=Role.reviewer.value)
    create.add_argument("--name", help="display name")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (otherwise prompted, or generated and printed when not a terminal)",
    )
    create.set_defaults(func=_create)
    reviewers.add_parser("list", help="list reviewer accounts").set_defaults(func=_list)
    password = reviewers.add_parser("set-password", help="set a reviewer's password (ends their sessions)")
    password.add_argument("email")
    password.add_argument("--password-stdin", action="store_true")
    password.set_defaults(func=_set_password)
    role = reviewers.add_parser("set-role", help="change a reviewer's role")
    role.add_argument("email")
    role.add_argument("role", choices=roles)
    role.set_defaults(func=lambda a: _update(a, role=a.role))
    for name, changes, text in (
        ("disable", {"active": False}, "disable an account (ends its sessions and tokens)"),
        ("enable", {"active": True}, "enable an account again"),
        ("unlock", {"unlock": True}, "lift a lockout after failed sign-ins"),
    ):
        command = reviewers.add_parser(name, help=text)
        command.add_argument("email")
        command.set_defaults(func=lambda a, c=changes: _update(a, **c))
    token = reviewers.add_parser("issue-token", help="issue an API token (rvw_…) for the review API")
    token.add_argument("email")
    token.add_argument("--label")
    token.set_defaults(func=_issue_token)
