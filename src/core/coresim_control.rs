//! kunpay-coresim's control endpoint: HTTP on loopback for test harnesses and people to read
//! and change the fault injection while the simulator runs (`[control] listen`).
//!
//! `GET /health` -> `{"connected", "handled"}`; `GET /faults` -> the faults in force;
//! `PUT /faults` with a JSON body of `[faults]` keys -> replaces them all (keys left out are
//! off) and answers the new set, or 400 with what is wrong.
//! Must never: listen beyond loopback (it has no authentication; the configuration check
//! refuses it), or leave half a change applied (a body is checked whole before it is used).

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};

use super::coresim::{CoreSimService, ServiceFaults};
use super::coresim_config::{FaultsSection, faults_from};

const MAX_BODY: usize = 16 * 1024;

struct Control {
    service: Arc<CoreSimService>,
    query_fence: bool,
}

fn describe(f: &ServiceFaults, query_fence: bool) -> Value {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    json!({
        "latency": d(f.latency),
        "post_delay": d(f.post_delay),
        "drop_every": f.drop_every,
        "duplicate_every": f.duplicate_every,
        "reorder_every": f.reorder_every,
        "hold_back": d(f.hold_back),
        "reject_every": f.reject_every,
        "reject_reason": f.reject_reason.map(|r| format!("{r:?}")),
        "crash_at": f.crash_at,
        "query_fence": query_fence,
    })
}

async fn health(State(c): State<Arc<Control>>) -> Json<Value> {
    Json(json!({
        "connected": c.service.is_connected(),
        "handled": c.service.handled(),
    }))
}

async fn get_faults(State(c): State<Arc<Control>>) -> Json<Value> {
    Json(describe(&c.service.faults(), c.query_fence))
}

async fn put_faults(
    State(c): State<Arc<Control>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, (StatusCode, String)> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, format!("{why}\n"));
    let section: FaultsSection =
        serde_json::from_slice(&body).map_err(|e| bad(format!("body: {e}")))?;
    if section
        .query_fence
        .is_some_and(|fence| fence != c.query_fence)
    {
        return Err(bad(
            "query_fence is fixed at start ([faults] query_fence in the configuration)".into(),
        ));
    }
    let faults = faults_from(&section).map_err(|e| bad(format!("{e:#}")))?;
    c.service.set_faults(faults.clone());
    tracing::warn!("coresim: faults changed through the control endpoint: {faults:?}");
    Ok(Json(describe(&faults, c.query_fence)))
}

/// Serves the control endpoint on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<CoreSimService>,
    query_fence: bool,
) -> std::io::Result<()> {
    let control = Arc::new(Control {
        service,
        query_fence,
    });
    let app = axum::Router::new()
        .route("/health", get(health))
        .route("/faults", get(get_faults).put(put_faults))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(control);
    axum::serve(listener, app).await
}
