//! One request, top to bottom: method → key → sources (via `resolve`) → one responder.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

use crate::resolve::{self, Outcome};
use crate::respond::{self, RequestInfo, ResponseBody};
use crate::runtime::Runtime;
use crate::{key, upstream};

pub async fn handle<B>(rt: Arc<Runtime>, req: Request<B>) -> Response<ResponseBody> {
    let resp = answer(&rt, &req).await;
    rt.metrics
        .request(resp.status(), resp.headers().get("x-cache"));
    tracing::debug!(method = %req.method(), path = %req.uri().path(), status = resp.status().as_u16(), "request");
    resp
}

async fn answer<B>(rt: &Arc<Runtime>, req: &Request<B>) -> Response<ResponseBody> {
    let method = match *req.method() {
        Method::GET => upstream::Method::Get,
        Method::HEAD => upstream::Method::Head,
        Method::OPTIONS => return respond::preflight(),
        // Nothing else is forwarded: a proxy in front of a bucket must never become a way to write to it.
        _ => return respond::error(StatusCode::METHOD_NOT_ALLOWED),
    };
    let key = match key::parse(req.uri().path(), &rt.config.server.path_prefix) {
        Ok(key) => key,
        Err(e) => {
            tracing::debug!(path = %req.uri().path(), error = %e, "refused path");
            return respond::error(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            );
        }
    };
    let range = match method {
        upstream::Method::Get => respond::forwardable_range(req.headers()),
        upstream::Method::Head => None,
    };
    match resolve::lookup(rt, &key, method, range).await {
        Outcome::Found(obj) => respond::build(
            obj,
            &RequestInfo {
                method: req.method(),
                headers: req.headers(),
            },
        ),
        Outcome::NotFound(source) => {
            let mut resp = respond::error(StatusCode::NOT_FOUND);
            if let Some(source) = source {
                resp.headers_mut().insert(
                    respond::x_cache(),
                    http::HeaderValue::from_static(source.x_cache()),
                );
            }
            resp
        }
        Outcome::Failed => respond::error(StatusCode::BAD_GATEWAY),
    }
}
