//! `GET /v2/keys`: the signing keys, so receivers can verify `Upstash-Signature`.
//! (The TS SDK also uses this call, with the dev keys, to detect a running dev server.)

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use utoipa::ToSchema;

use super::render::Reply;
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v2/keys", get(get_keys))
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
    Reply(SigningKeys {
        current: state.signer.current_key().to_string(),
        next: state.signer.next_key().to_string(),
    })
}
