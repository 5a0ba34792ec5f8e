"""Settings for every process of the service, read from the environment (prefix ``MODERATION_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(".data")


class Settings(BaseSettings):
    """All settings of the service; each one is documented in the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="MODERATION_", env_file=".env", extra="ignore")

    # Infrastructure
    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/moderation",
        validation_alias=AliasChoices("MODERATION_DATABASE_URL", "DATABASE_URL"),
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("MODERATION_REDIS_URL", "REDIS_URL"),
    )
    broker_url: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    public_base_url: str = "http://127.0.0.1:8000"

    # Blob store
    blob_backend: Literal["local", "s3"] = "local"
    blob_dir: Path | None = None
    blob_fsync: bool = True
    s3_bucket: str = "moderation-images"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_prefix: str = "images/"

    # Intake limits
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_caption_chars: int = 4000
    allowed_image_formats: list[str] = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
    rate_limit_per_minute: int = 600
    rate_limit_burst: int = 100

    # Outbound HTTP (image_url fetches and webhooks)
    allow_private_network: bool = False
    fetch_allowed_cidrs: list[str] = []
    fetch_timeout_seconds: float = 10.0
    fetch_max_redirects: int = 5

    # Model and engine
    model: str = Field(
        default="Qwen/Qwen3-VL-8B-Instruct",
        validation_alias=AliasChoices("MODERATION_MODEL", "MODERATION_MODEL_PATH"),
    )
    model_revision: str | None = None
    engine_backend: Literal["transformers"] = "transformers"
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Literal["none", "int8", "nf4"] = "none"
    attn_implementation: str = "sdpa"
    max_new_tokens: int = 96
    image_max_pixels: int = 512 * 512
    image_min_pixels: int = 32 * 32
    warmup: bool = True

    # Batching and pipeline
    batch_max_size: int = 8
    batch_wait_ms: int = 50
    processing_lease_seconds: int = 300
    queue_redeliver_seconds: int = 120
    max_attempts: int = 3
    sweep_interval_seconds: float = 15.0

    # Routing defaults for new tenants
    default_block_threshold: float = 0.8
    default_allow_threshold: float = 0.3
    default_min_confidence: float = 0.6

    # Webhooks
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 2.0
    webhook_backoff_max_seconds: float = 3600.0

    # Review
    review_lease_seconds: int = 600

    @property
    def effective_broker_url(self) -> str:
        """Celery broker URL: the explicit broker setting, or Redis."""
        return self.broker_url or self.redis_url

    @property
    def effective_blob_dir(self) -> Path:
        """Folder of the local blob store."""
        return self.blob_dir or (self.data_dir / "blobs")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()
