//! `GET /v2/keys`: the signing keys, so receivers can verify `Upstash-Signature`.
//! (The TS SDK also uses this call, with the dev keys, to detect a running dev server.)

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v2/keys", get(get_keys))
}

async fn get_keys(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "current": state.signer.current_key(),
        "next": state.signer.next_key(),
    }))
}
