"""The MLflow adapter: tracking, publish, sign, promote through gates, load, list, dossiers."""

from .comments import Comment, add_comment, list_comments
from .describe import describe_version
from .dossier import log_dossier, write_dossier
from .errors import (
    CommentError,
    DossierError,
    EvidenceError,
    GateError,
    ModelArtifactError,
    ModelNotFoundError,
    ModelSignatureError,
    ModelUriError,
    PromotionRefusedError,
    RegistryError,
    SigningKeyError,
)
from .evidence import EVIDENCE_TAG, VerifiedVersion, attest_version, sign_evidence, verify_version
from .gates import GateConfig, GateResult, VersionFacts, default_gates, evaluate_gates
from .history import HISTORY_TAG, read_history
from .listing import list_versions
from .load import LoadedModel, load_model, resolve_version
from .promotion import PromotionResult, auto_promote, promote, rollback
from .publish import CHAMPION, PublishedVersion, publish_model
from .signing import generate_keypair, model_digest, sign_model_dir, verify_model_dir
from .store import RegistryStore, default_store
from .tracking import TrackingRun
from .uri import ModelRef, parse_model_uri

__all__ = [
    "CHAMPION",
    "HISTORY_TAG",
    "Comment",
    "CommentError",
    "DossierError",
    "EVIDENCE_TAG",
    "EvidenceError",
    "GateConfig",
    "GateError",
    "GateResult",
    "LoadedModel",
    "ModelArtifactError",
    "ModelNotFoundError",
    "ModelRef",
    "ModelSignatureError",
    "ModelUriError",
    "PromotionRefusedError",
    "PromotionResult",
    "PublishedVersion",
    "RegistryError",
    "RegistryStore",
    "SigningKeyError",
    "TrackingRun",
    "VerifiedVersion",
    "VersionFacts",
    "add_comment",
    "attest_version",
    "auto_promote",
    "default_gates",
    "default_store",
    "describe_version",
    "evaluate_gates",
    "generate_keypair",
    "list_comments",
    "list_versions",
    "load_model",
    "log_dossier",
    "model_digest",
    "parse_model_uri",
    "promote",
    "publish_model",
    "read_history",
    "resolve_version",
    "rollback",
    "sign_evidence",
    "sign_model_dir",
    "verify_model_dir",
    "verify_version",
    "write_dossier",
]
