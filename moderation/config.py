"""Settings for every process of the service, read from the environment (prefix ``MODERATION_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All settings of the service; the README's settings table is generated from these descriptions."""

    model_config = SettingsConfigDict(
        env_prefix="MODERATION_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # Infrastructure
    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/moderation",
        validation_alias=AliasChoices("MODERATION_DATABASE_URL", "DATABASE_URL"),
        description="Postgres URL (SQLAlchemy form, psycopg 3 driver). `DATABASE_URL` is accepted too.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("MODERATION_REDIS_URL", "REDIS_URL"),
        description="Redis URL: Celery broker (unless `BROKER_URL` is set) and rate limiter. `REDIS_URL` works too.",
    )
    broker_url: str | None = Field(default=None, description="Celery broker URL, if not the Redis above.")
    data_dir: Path = Field(default=Path(".data"), description="Folder for local state (blobs by default).")

    # Blob store
    blob_backend: Literal["local", "s3"] = Field(default="local", description="Where image bytes live.")
    blob_dir: Path | None = Field(
        default=None, description="Folder of the local blob store; `DATA_DIR/blobs` if unset."
    )
    blob_fsync: bool = Field(default=True, description="fsync each new blob before the submission commits.")
    blob_direct_io: bool = Field(
        default=True,
        description="The `segments` layout appends images with direct I/O (O_DIRECT), past the page cache: "
        "intake writes each image once, and copying it into fresh cache pages costs more CPU than the write. "
        "Filesystems without direct I/O are written through the page cache whatever this says.",
    )
    blob_local_layout: Literal["segments", "files"] = Field(
        default="segments",
        description="How the local blob store keeps images: `segments` appends them to per-process segment "
        "files (one data sync per batch of concurrent writes), `files` writes a file per image. Either layout "
        "reads the other's blobs.",
    )
    blob_segment_max_bytes: int = Field(
        default=1 << 30,
        ge=1 << 20,
        description="Size at which a local blob segment is sealed (indexed) and the next one is started.",
    )
    s3_bucket: str = Field(default="moderation-images", description="S3 bucket of the s3 blob store.")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, R2, …); AWS if unset."
    )
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(
        default=None, description="S3 access key; the AWS default chain if unset."
    )
    s3_secret_access_key: str | None = Field(default=None, description="S3 secret key.")
    s3_prefix: str = Field(default="images/", description="Key prefix of blobs in the bucket.")

    # Intake limits
    max_image_bytes: int = Field(default=10 * 1024 * 1024, description="Largest accepted image (413 above).")
    max_image_pixels: int = Field(
        default=50_000_000, description="Most pixels an image may have (422 above)."
    )
    intake_image_check: Literal["structural", "decode"] = Field(
        default="structural",
        description="How intake checks an image beyond its header: `structural` walks the file's container "
        "(complete, well formed; a JPEG that ends with its end-of-image marker only as far as its first scan, "
        "the GPU worker walks the rest and fails what still cannot be decoded), `decode` decodes it.",
    )
    intake_batch_max: int = Field(
        default=64,
        ge=1,
        description="Most submissions one API process stores in one pass. Intake is group-committed: the "
        "submissions that arrived while the previous pass ran share one data sync of their images and one "
        "INSERT (one transaction); a lone submission is written at once.",
    )
    intake_job_interval_ms: float = Field(
        default=20.0,
        ge=0,
        description="Longest the GPU job of a committed submission is held, so that consecutive intake batches "
        "of one API process share one job (one broker publish) under load; 0 sends a job per batch. A job held "
        "when the process dies is sent by the sweeper.",
    )
    intake_store_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Images of one intake batch uploaded (S3) or synced (local `files` layout) in parallel; "
        "the `segments` layout syncs a batch at once. Unset: 8 with the local blob store, 32 with S3.",
    )
    intake_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest an intake request waits for its submission to be stored; then 503 "
        "`intake_timeout` (it may still be stored: retry with the same Idempotency-Key). API processes' "
        "database statements and lock waits are capped at the same time, and /readyz fails while intake's "
        "writer has been stuck on one batch for longer.",
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body of every route but intake, whose limit follows `max_image_bytes` "
        "(413 `payload_too_large` above; refused before the body is read when Content-Length says so).",
    )
    request_body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest a client may take to send a request body, on every route (408 "
        "`request_timeout` after it): a client that trickles its upload in cannot hold a connection for long.",
    )
    max_caption_chars: int = Field(default=4000, description="Longest accepted caption, in characters.")
    allowed_image_formats: list[str] = Field(
        default=["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"], description="Accepted formats (415 otherwise)."
    )
    rate_limit_per_minute: int = Field(
        default=600,
        description="Default submissions per minute per tenant (a tenant may override it); 0 = off.",
    )
    rate_limit_burst: int = Field(
        default=100, description="Requests a tenant may send at once above its rate."
    )

    worker_metrics_port: int | None = Field(
        default=9100,
        description="Port on which each Celery worker serves its Prometheus metrics (verdicts, inference time, "
        "failures, webhook attempts, sweeper recoveries); unset: none. Under PROMETHEUS_MULTIPROC_DIR the "
        "API's /metrics shows them too.",
    )
    log_level: str = Field(
        default="INFO",
        description="Level of the API's and the CLI's logs (`DEBUG`, `INFO`, `WARNING`, "
        "…); read from the environment before anything else starts. Celery roles take `-l` on their "
        "command line.",
    )

    # Outbound HTTP (image_url fetches and webhooks)
    allow_private_network: bool = Field(
        default=False,
        description="Let image_url fetches and webhooks reach private/loopback addresses. Development only.",
    )
    fetch_allowed_cidrs: list[str] = Field(
        default=[],
        description="Networks always reachable by outbound requests (JSON list, e.g. an internal CDN).",
    )
    fetch_timeout_seconds: float = Field(default=10.0, description="Overall deadline of an image_url fetch.")
    fetch_max_redirects: int = Field(default=5, description="Redirects an image_url fetch may follow.")
    fetch_concurrency: int = Field(
        default=16,
        ge=1,
        description="image_url fetches one API process runs at once; more wait. They run on threads of their "
        "own, so slow origins never hold up other requests.",
    )

    # Model and engine
    model: str = Field(
        default="Qwen/Qwen3-VL-8B-Instruct",
        validation_alias=AliasChoices("MODERATION_MODEL", "MODERATION_MODEL_PATH"),
        description="Hugging Face id or local folder of the Qwen3-VL model (`make run` uses the fixture if unset).",
    )
    model_revision: str | None = Field(
        default=None,
        description="Model revision (commit) to load, and the one verdicts name. Unset for a local folder: a "
        "digest of its files (so weights replaced in place are a new revision for the verdict cache).",
    )
    engine_backend: Literal["transformers", "openai"] = Field(
        default="transformers",
        description="Inference backend: `transformers` (in-process) or `openai` (an OpenAI-compatible server).",
    )
    device: str = Field(default="auto", description="`auto` (CUDA if present), `cuda`, `cuda:1`, `cpu`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype; `auto` is bfloat16 on GPU, float32 on CPU."
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        default="none", description="bitsandbytes quantization of the weights (GPU only)."
    )
    attn_implementation: str = Field(default="sdpa", description="transformers attention implementation.")
    max_new_tokens: int = Field(
        default=256,
        description=(
            "Cap on generated tokens (description, visible text and explanation; a reply ends at the blank "
            "line after its explanation, typically 120-220 tokens)."
        ),
    )
    max_caption_tokens: int = Field(
        default=2048,
        ge=16,
        description="Longest caption the model reads, in tokens (longer ones are cut; the blocklist still reads "
        "them whole): a batch is padded to its longest prompt.",
    )
    image_max_pixels: int = Field(
        default=512 * 512, description="Pixel budget per image (512×512 = 256 visual tokens)."
    )
    image_min_pixels: int = Field(default=32 * 32, description="Smallest size an image is scaled up to.")
    warmup: bool = Field(default=True, description="Run a warm-up batch when a GPU worker starts.")
    cuda_graphs: bool = Field(
        default=True, description="Replay each decode step as a CUDA graph (GPU, unquantized)."
    )
    decode_cache_gib: float = Field(
        default=0.0,
        ge=0,
        description=(
            "GPU memory for the decode buffers and CUDA graphs of past batch shapes, least recently used "
            "freed first; 0 takes 35% of the memory free once the model is loaded."
        ),
    )
    compile_decode: bool = Field(
        default=True,
        description=(
            "torch.compile the text model's layers (GPU, unquantized): ~1.3x throughput for 20-50 s of "
            "compiling at worker start (cached on disk after the first start)."
        ),
    )

    # Batching and pipeline
    batch_max_size: int = Field(
        default=128,
        description=(
            "Most submissions a GPU worker judges in one batch (128 takes ~38 GiB with the 8B model; on a "
            "smaller card the engine halves its batch when it runs out of memory)."
        ),
    )
    batch_wait_ms: int = Field(
        default=50, description="How long a batch waits for more submissions to arrive."
    )
    processing_lease_seconds: int = Field(
        default=300,
        description="A worker's lease on a batch; after it expires the sweeper re-enqueues the work.",
    )
    queue_redeliver_seconds: int = Field(
        default=120,
        description="A queued submission whose job is older than this is re-enqueued (lost broker).",
    )
    max_attempts: int = Field(
        default=3, description="Processing attempts before a submission ends as failed."
    )
    sweep_interval_seconds: float = Field(default=15.0, description="How often beat runs the sweeper.")
    retention_days: int = Field(
        default=0,
        ge=0,
        description="Erase a final submission's content and image this many days after it was made; 0 keeps "
        "everything. A tenant's own `retention_days` overrides it.",
    )
    retention_interval_seconds: float = Field(
        default=600.0, gt=0, description="How often beat erases expired submissions and deletes their images."
    )

    # Routing defaults for new tenants
    default_block_threshold: float = Field(
        default=0.8, description="New tenants: conflict score that blocks."
    )
    default_allow_threshold: float = Field(
        default=0.3, description="New tenants: conflict score that allows."
    )
    default_min_confidence: float = Field(
        default=0.6, description="New tenants: confidence below which to review."
    )

    # Webhooks
    webhook_timeout_seconds: float = Field(
        default=10.0, description="Timeout of one webhook delivery attempt."
    )
    webhook_max_attempts: int = Field(
        default=8, description="Delivery attempts before a webhook is given up."
    )
    webhook_backoff_base_seconds: float = Field(
        default=2.0, description="First retry delay; doubles each attempt."
    )
    webhook_backoff_max_seconds: float = Field(default=3600.0, description="Longest retry delay.")

    # Review
    review_lease_seconds: int = Field(default=600, description="How long a reviewer holds a claimed item.")
    review_max_hold_seconds: int = Field(
        default=3600,
        ge=60,
        description="Longest a claim is renewed (a review screen renews its lease while open): after it the "
        "lease runs out and the item returns to the queue unless the reviewer claims it again.",
    )

    # Policy: blocklists, known images, verdict cache
    blocklist_max_terms: int = Field(default=1000, description="Most blocklist terms a tenant may have.")
    blocklist_max_patterns: int = Field(
        default=100, description="Most blocklist regular expressions a tenant may have."
    )
    blocklist_pattern_max_chars: int = Field(
        default=200, description="Longest accepted blocklist regular expression, in characters."
    )
    blocklist_regex_timeout_ms: int = Field(
        default=25,
        description="Time limit of one blocklist regular expression on one text; a slower match is skipped.",
    )
    known_image_max_distance: int = Field(
        default=10,
        description="Largest pHash Hamming distance (of 64 bits) for a near-duplicate of a known image.",
    )
    known_image_dhash_max_distance: int = Field(
        default=12,
        description="Largest dHash Hamming distance that must also hold for a known-image match.",
    )
    verdict_cache_enabled: bool = Field(
        default=True,
        description="Reuse the verdict of the same image bytes, caption, tenant policy version and model.",
    )
    verdict_cache_max_age_seconds: int = Field(
        default=30 * 24 * 3600, description="Oldest stored verdict the verdict cache reuses."
    )
    review_session_hours: float = Field(
        default=12.0, description="How long a reviewer's login session lasts before signing in again."
    )
    review_max_failed_logins: int = Field(
        default=5, description="Failed password attempts in a row that lock a reviewer account."
    )
    review_lockout_seconds: int = Field(
        default=900, description="How long a locked reviewer account stays locked."
    )
    review_blur_threshold: float = Field(
        default=0.5,
        description="Review screen: blur the image when its sexual, violence or self-harm score reaches this.",
    )
    review_cookie_secure: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="`Secure` flag of the review session cookie; `auto` sets it except on http://localhost.",
    )

    # OpenAI-compatible inference server (engine_backend=openai)
    openai_base_url: str = Field(
        default="http://127.0.0.1:8001/v1",
        description="Base URL of the OpenAI-compatible server, up to and including `/v1` (vLLM, SGLang, …).",
    )
    openai_api_key: str | None = Field(
        default=None, description="Bearer token for the OpenAI-compatible server, if it needs one."
    )
    openai_model: str = Field(
        default="Qwen/Qwen3-VL-8B-Instruct",
        description="Model name the OpenAI-compatible server serves (recorded in every verdict).",
    )
    openai_timeout_seconds: float = Field(
        default=60.0, description="Timeout of one call to the OpenAI-compatible server."
    )
    openai_concurrency: int = Field(
        default=8, description="Calls to the OpenAI-compatible server in flight at once per worker."
    )
    openai_top_logprobs: int = Field(
        default=20,
        description="top_logprobs asked per answer (vLLM allows up to `--max-logprobs`, 20 by default).",
    )
    openai_max_retries: int = Field(
        default=3, description="Retries of a call that failed to connect or got 5xx/429, with backoff."
    )

    @property
    def effective_intake_store_concurrency(self) -> int:
        """How many images one API process writes to the blob store at once."""
        if self.intake_store_concurrency is not None:
            return self.intake_store_concurrency
        return 32 if self.blob_backend == "s3" else 8

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


def settings_table() -> str:
    """A Markdown table of every setting: environment variable, default and meaning."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else (", ".join(default) if isinstance(default, list) else str(default))
        rows.append(f"| `MODERATION_{name.upper()}` | `{shown}` | {field.description} |")
    return "\n".join(rows)
