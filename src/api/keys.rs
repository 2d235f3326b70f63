//! `GET /v2/keys`: the signing keys, so receivers can verify `Upstash-Signature`;
//! `POST /v2/keys/rotate` (and the Go SDK's `POST /v2/rotate`): next becomes current, a fresh key
//! becomes next. (The TS SDK also uses `GET /v2/keys`, with the dev keys, to detect a running dev
//! server.)
//!
//! The keys are the view of the signing-keys topic (`model::signing_keys`); a rotation is one
//! record written through, so this process signs with the new key as soon as it answers and every
//! other process within its tail lag. Rotations in one process are serialised, so two concurrent
//! calls rotate twice rather than both from the same keys.

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::render::Reply;
use super::AppState;
use crate::model::now_ms;
use crate::model::signing_keys::SigningKeysRecord;

/// One rotation at a time in this process.
static ROTATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/keys", get(get_keys))
        .route("/v2/keys/rotate", post(rotate))
        .route("/v2/rotate", post(rotate_alias))
}

/// The signing keys: `Upstash-Signature` is signed with `current`; `next` replaces it on rotation.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SigningKeys {
    pub current: String,
    pub next: String,
}

/// The signing keys.
#[utoipa::path(get, path = "/v2/keys", operation_id = "getSigningKeys", tag = "keys",
    responses((status = 200, description = "The current and next signing keys", body = SigningKeys)))]
pub async fn get_keys(State(state): State<AppState>) -> Reply<SigningKeys> {
    let signer = &state.views().signer;
    Reply(SigningKeys {
        current: signer.current_key(),
        next: signer.next_key(),
    })
}

/// Rotates the signing keys: next becomes current, a fresh key becomes next, in every process.
#[utoipa::path(post, path = "/v2/keys/rotate", operation_id = "rotateSigningKeys", tag = "keys",
    responses((status = 200, description = "The new current and next signing keys", body = SigningKeys)))]
pub async fn rotate(State(state): State<AppState>) -> Result<Reply<SigningKeys>, ApiError> {
    let _one_at_a_time = ROTATION.lock().await;
    let signer = &state.views().signer;
    // Before the topic was seeded (its seed write failed), rotate from the configured keys.
    let base = signer
        .record()
        .unwrap_or_else(|| SigningKeysRecord::seed(&signer.current_key(), &signer.next_key()));
    let rotated = base.rotated(now_ms());
    state
        .writer
        .put(rotated.clone())
        .await
        .map_err(|e| ApiError::not_stored("key rotation", &e))?;
    tracing::info!("signing keys rotated");
    Ok(Reply(SigningKeys {
        current: rotated.current,
        next: rotated.next,
    }))
}

/// The Go SDK's spelling of [`rotate`].
#[utoipa::path(post, path = "/v2/rotate", operation_id = "rotateSigningKeysGo", tag = "keys",
    responses((status = 200, description = "The new current and next signing keys", body = SigningKeys)))]
pub async fn rotate_alias(state: State<AppState>) -> Result<Reply<SigningKeys>, ApiError> {
    rotate(state).await
}
