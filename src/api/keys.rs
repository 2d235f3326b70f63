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
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::model::now_ms;
use crate::model::signing_keys::SigningKeysRecord;

/// One rotation at a time in this process.
static ROTATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/keys", get(get_keys))
        .route("/v2/keys/rotate", post(rotate))
        .route("/v2/rotate", post(rotate))
}

fn keys(current: &str, next: &str) -> Json<Value> {
    Json(json!({ "current": current, "next": next }))
}

async fn get_keys(State(state): State<AppState>) -> Json<Value> {
    let signer = &state.views().signer;
    keys(&signer.current_key(), &signer.next_key())
}

async fn rotate(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
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
    Ok(keys(&rotated.current, &rotated.next))
}
