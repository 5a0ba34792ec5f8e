"""A realistic review queue for the UI tests and the README screenshots: images, captions, history."""

from __future__ import annotations

import io
import math
import random
from datetime import timedelta
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import utcnow
from moderation.review import service
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerRef
from moderation.submissions.models import Submission, Verdict
from moderation.tenants.models import Tenant
from tests.review.helpers import add_review_item, make_tenant

HISTORY_CAPTIONS = [
    "Brand new AirPods Pro, sealed, $40 shipped",
    "周末去爬山，风景太美了",
    "DM me for cheap followers, 1000 for $5",
    "My grandma's dumpling recipe 🥟",
    "Rolex Submariner AAA quality, looks 100% real",
    "这款面霜三天祛斑，医生都推荐",
    "Sunset over the harbour tonight",
    "Crypto doubler: send 0.1 BTC, get 0.2 back",
    "Our team at the charity run this morning",
    "正品 iPhone 15 只要 999 元，先到先得",
    "Fight caught on camera outside the club",
    "Handmade ceramic mugs, new batch in the shop",
]
FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc")
ANN = ReviewerRef("ann.lee@example.com", Role.reviewer)
RAVI = ReviewerRef("ravi.k@example.com", Role.reviewer)
MEI = ReviewerRef("mei.zhang@example.com", Role.reviewer)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(str(FONT), size) if FONT.exists() else ImageFont.load_default()


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(1, h - 1)
        draw.line(
            [(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def sneaker() -> bytes:
    """A plain white sneaker on a wooden floor."""
    img = _gradient(960, 720, (196, 150, 108), (120, 82, 52))
    draw = ImageDraw.Draw(img)
    for x in range(0, 960, 120):
        draw.line([(x, 0), (x + 60, 720)], fill=(110, 75, 48), width=3)
    shadow = Image.new("L", (960, 720), 0)
    ImageDraw.Draw(shadow).ellipse([190, 470, 800, 560], fill=140)
    img.paste((60, 40, 25), mask=shadow.filter(ImageFilter.GaussianBlur(18)))
    draw.rounded_rectangle(
        [220, 330, 760, 500], radius=70, fill=(246, 246, 243), outline=(205, 205, 200), width=4
    )
    draw.polygon(
        [(220, 420), (400, 250), (560, 250), (600, 360), (220, 440)],
        fill=(250, 250, 248),
        outline=(210, 210, 205),
    )
    draw.rectangle([220, 470, 770, 510], fill=(232, 232, 228))
    for i in range(6):
        draw.line([(420 + i * 26, 280 + i * 8), (470 + i * 26, 300 + i * 8)], fill=(170, 170, 168), width=4)
    return _jpeg(img)


def street() -> bytes:
    """A crowded street at night (the screen blurs it)."""
    img = _gradient(960, 640, (20, 24, 48), (60, 40, 60))
    draw = ImageDraw.Draw(img)
    rng = random.Random(3)
    for _ in range(40):
        x, y = rng.randrange(960), rng.randrange(200, 600)
        draw.ellipse([x, y, x + 40, y + 90], fill=(rng.randrange(40, 90), 30, 40))
    draw.rectangle([380, 470, 620, 520], fill=(150, 20, 30))
    for x in range(0, 960, 90):
        draw.ellipse([x, 60, x + 14, 74], fill=(255, 220, 120))
    return _jpeg(img.filter(ImageFilter.GaussianBlur(1.2)))


def tea() -> bytes:
    """A slimming-tea advert with big Chinese text."""
    img = _gradient(800, 800, (236, 252, 240), (160, 220, 180))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([250, 250, 550, 700], radius=40, fill=(46, 125, 80))
    draw.rectangle([290, 380, 510, 560], fill=(250, 250, 240))
    draw.text((318, 430), "纤茶", font=_font(72), fill=(46, 125, 80))
    draw.text((110, 60), "7天瘦10斤", font=_font(96), fill=(200, 30, 40))
    draw.text((230, 180), "限时特价 ¥99", font=_font(52), fill=(30, 30, 30))
    return _jpeg(img)


def giveaway() -> bytes:
    """A phone giveaway banner."""
    img = _gradient(900, 600, (255, 94, 98), (255, 153, 102))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([330, 120, 570, 560], radius=36, fill=(30, 30, 36))
    draw.rounded_rectangle([345, 140, 555, 540], radius=24, fill=(90, 110, 250))
    draw.text((60, 40), "FREE iPhone", font=_font(64), fill=(255, 255, 255))
    draw.text((620, 470), "link in bio", font=_font(40), fill=(255, 255, 255))
    return _jpeg(img)


def cat() -> bytes:
    """A cat in the sun, drawn simply."""
    img = _gradient(900, 700, (255, 236, 179), (250, 200, 120))
    draw = ImageDraw.Draw(img)
    draw.ellipse([300, 300, 640, 600], fill=(230, 140, 60))
    draw.ellipse([360, 180, 580, 380], fill=(236, 150, 70))
    draw.polygon([(380, 220), (400, 130), (450, 200)], fill=(236, 150, 70))
    draw.polygon([(510, 200), (560, 130), (570, 230)], fill=(236, 150, 70))
    for cx in (430, 520):
        draw.ellipse([cx - 12, 260, cx + 12, 290], fill=(40, 40, 30))
    for angle in range(0, 360, 30):
        r = math.radians(angle)
        draw.line(
            [(120, 120), (120 + 90 * math.cos(r), 120 + 90 * math.sin(r))], fill=(255, 250, 220), width=5
        )
    draw.ellipse([80, 80, 160, 160], fill=(255, 245, 200))
    return _jpeg(img)


def knife() -> bytes:
    """A folding knife on a table."""
    img = _gradient(900, 600, (70, 74, 82), (40, 42, 48))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([200, 300, 520, 360], radius=20, fill=(120, 80, 50))
    draw.polygon([(520, 305), (760, 290), (700, 350), (520, 355)], fill=(200, 205, 212))
    return _jpeg(img)


OPEN = [
    # (image, caption, conflict, scores, description, visible text, explanation, external id)
    (
        street,
        "今天在街上看到的，太可怕了，大家注意安全",
        0.52,
        {"violence": 0.86, "misleading": 0.22},
        "A crowded street at night; a person lies on the ground with a dark stain beside them, people gather.",
        "",
        "The image may show an injured person; the caption reports it as news. Graphic violence needs a person.",
        "wb-88120",
    ),
    (
        tea,
        "纯天然减肥茶，一周瘦十斤，无任何副作用！私信下单",
        0.66,
        {"scam_fraud": 0.72, "misleading": 0.79, "drugs": 0.18},
        "A green tea box advertised as a slimming product, with large red promotional text.",
        "7天瘦10斤 限时特价 ¥99",
        "Weight-loss claims ('10 jin in a week, no side effects') are not supported by anything in the image.",
        "wb-88121",
    ),
    (
        giveaway,
        "Follow for follow!! Free iPhone giveaway, link in bio 🔥🔥",
        0.61,
        {"spam": 0.83, "scam_fraud": 0.58},
        "A phone on an orange banner reading 'FREE iPhone' and 'link in bio'.",
        "FREE iPhone  link in bio",
        "A giveaway that asks for follows and an off-site link is a common spam and phishing pattern.",
        "ig-55310",
    ),
    (
        knife,
        "Selling my hunting knife, barely used. Pickup only.",
        0.48,
        {"weapons": 0.67},
        "A folding knife with a wooden handle lying on a dark table.",
        "",
        "A private sale of a knife; whether this is allowed depends on the marketplace's weapons policy.",
        "mk-20931",
    ),
    (
        cat,
        "My cat enjoying the sun ☀️ 我家猫咪晒太阳",
        0.41,
        {"misleading": 0.08},
        "An orange cat curled up in warm sunlight.",
        "",
        "Caption and image agree; the model was not confident enough to allow it on its own.",
        "ig-55311",
    ),
]


def _decide(
    session: Session, who: ReviewerRef, decision: ReviewDecision, categories: list[str] | None = None
) -> ReviewItem:
    item = service.claim_next(session, who, 600)
    assert item is not None and item.lease_token is not None
    return service.decide(
        session, item.id, reviewer=who, lease_token=item.lease_token, decision=decision, categories=categories
    )


def seed_demo(sessions: sessionmaker[Session], settings: Settings, blobs: BlobStore) -> Tenant:
    """Fill the queue with history (decisions, QA, an escalation, an appeal) and open items."""
    rng = random.Random(7)
    with sessions() as session, session.begin():
        shop = make_tenant(session, settings, "globex-market")
        social = make_tenant(session, settings, "acme-social")
        # Labelled history: rejections mostly score high, approvals low, with some overlap.
        for i in range(48):
            reject = rng.random() < 0.5
            conflict = min(0.97, max(0.32, rng.gauss(0.68 if reject else 0.44, 0.07)))
            category = rng.choice(["scam_fraud", "spam", "misleading", "violence"])
            scores = {category: min(0.95, conflict + rng.uniform(-0.1, 0.12))} if reject else {}
            add_review_item(
                session,
                rng.choice([shop, social]),
                blobs,
                settings,
                caption=HISTORY_CAPTIONS[i % len(HISTORY_CAPTIONS)],
                conflict=conflict,
                scores=scores,
                seed=100 + i,
            )
            who = [ANN, RAVI, MEI][i % 3]
            _decide(
                session,
                who,
                ReviewDecision.reject if reject else ReviewDecision.approve,
                [category] if reject else None,
            )
        service.sample_for_qa(session, ReviewerRef("lena.ortiz@example.com", Role.lead), 12)
        for i in range(9):
            # The sample is random: a reviewer gets no QA item whose original decision was their own.
            rotation = [RAVI, MEI, ANN][i % 3 :] + [RAVI, MEI, ANN][: i % 3]
            claims = ((who, service.claim_next(session, who, 600)) for who in rotation)
            who, item = next(((w, it) for w, it in claims if it is not None), (rotation[0], None))
            assert item is not None and item.lease_token is not None and item.origin_id is not None
            origin = session.get(ReviewItem, item.origin_id)
            assert origin is not None and origin.decision is not None
            decision = (
                origin.decision
                if i % 4
                else (
                    ReviewDecision.approve
                    if origin.decision == ReviewDecision.reject
                    else ReviewDecision.reject
                )
            )
            cats = (origin.categories or ["spam"]) if decision == ReviewDecision.reject else None
            service.decide(
                session,
                item.id,
                reviewer=who,
                lease_token=item.lease_token,
                decision=decision,
                categories=cats,
            )
        # Open QA items go to the back of the queue; release the rest.
        # The appeal: Ann rejected the sneaker; the seller appeals.
        appealed = add_review_item(
            session,
            shop,
            blobs,
            settings,
            image=sneaker(),
            caption="Genuine Nike Air Jordan 1, brand new in box, only $25 — DM me!",
            conflict=0.74,
            scores={"scam_fraud": 0.81, "misleading": 0.64},
            external_id="mk-20417",
            description="A plain white canvas sneaker without any logo, photographed on a wooden floor.",
            explanation=(
                "The caption sells 'genuine Nike Air Jordans' at a fraction of their price, but the photo shows "
                "an unbranded sneaker with no visible logo."
            ),
        )
        item = service.claim_next(session, ANN, 600)
        assert item is not None and item.id == appealed.id and item.lease_token is not None
        service.decide(
            session,
            item.id,
            reviewer=ANN,
            lease_token=item.lease_token,
            decision=ReviewDecision.reject,
            categories=["scam_fraud"],
            note="No logo anywhere; price far too low.",
        )

        def add_open(ext: str) -> None:
            builder, caption, conflict, scores, description, visible, explanation, _ = next(
                o for o in OPEN if o[7] == ext
            )
            add_review_item(
                session,
                social if ext.startswith(("ig", "wb")) else shop,
                blobs,
                settings,
                image=builder(),
                caption=caption,
                conflict=conflict,
                scores=scores,
                description=description,
                visible_text=visible,
                explanation=explanation,
                external_id=ext,
            )

        # Mei sends the knife sale to the leads; Ravi is looking at the cat right now.
        add_open("mk-20931")
        knife_item = service.claim_next(session, MEI, 600)
        assert knife_item is not None and knife_item.lease_token is not None
        service.decide(
            session,
            knife_item.id,
            reviewer=MEI,
            lease_token=knife_item.lease_token,
            decision=ReviewDecision.escalate,
            note="Weapons sale — is this allowed on the marketplace?",
            categories=["weapons"],
        )
        add_open("ig-55311")
        assert service.claim_next(session, RAVI, 600) is not None
        for ext in ("wb-88120", "wb-88121", "ig-55310"):
            add_open(ext)
        service.appeal(
            session,
            shop,
            appealed.submission_id,
            "This is a genuine pair, I have the receipt from the Nike store.",
        )
        _spread_in_time(session, rng)
        session.expunge(shop)
    return shop


def _spread_in_time(session: Session, rng: random.Random) -> None:
    """Make the history look lived-in: decisions over the last days, open items waiting for a while."""
    now = utcnow()
    items = session.scalars(select(ReviewItem).order_by(ReviewItem.created_at)).all()
    for n, item in enumerate(items):
        if item.state == ReviewState.decided and item.decided_at is not None:
            item.decided_at = now - timedelta(hours=rng.uniform(1, 96))
            item.created_at = item.decided_at - timedelta(minutes=rng.uniform(3, 90))
        else:
            item.created_at = now - timedelta(minutes=9 + 23 * (len(items) - n) % 170)
        submission = session.get(Submission, item.submission_id)
        if submission is not None and submission.created_at > item.created_at:
            submission.created_at = item.created_at - timedelta(seconds=40)
            verdict = session.scalars(select(Verdict).where(Verdict.submission_id == submission.id)).one()
            verdict.decided_at = submission.created_at + timedelta(seconds=3)
    session.flush()
