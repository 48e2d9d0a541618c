//! The HTTP side of EWS: one POST per operation, authentication, the affinity
//! headers Exchange 2013+ needs, and turning HTTP and SOAP failures into
//! [`EwsError`]s that say what to do next (wait, re-authenticate, reconnect).
//!
//! Ordinary calls and GetStreamingEvents use two separate HTTP clients: a
//! stream holds its connection for up to 30 minutes, and sharing a pool of
//! HTTP/1.1 connections between streams and calls has starved other clients'
//! calls (PROTOCOL.md §3). The stream client keeps no idle connections, so
//! every stream gets a fresh TCP connection of its own.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use reqwest::{StatusCode, header::HeaderMap};
use tracing::{debug, info};

use super::{
    config::{Auth, EwsConfig},
    messages::{self, ResponseError, Status},
    xml::Element,
};

/// What to wait when Exchange says it is busy but not for how long.
const DEFAULT_BUSY_WAIT: Duration = Duration::from_secs(30);
/// The longest wait honoured from BackOffMilliseconds or Retry-After.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(15 * 60);
/// How much of an unexpected HTTP body goes into an error message.
const EXCERPT_BYTES: usize = 200;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The cookie Exchange uses to pin a subscription group to one backend.
pub const BACKEND_OVERRIDE_COOKIE: &str = "X-BackEndOverrideCookie";

#[derive(Debug, thiserror::Error)]
pub enum EwsError {
    #[error("Exchange is busy (retry in {0:?})")]
    Busy(Duration),
    #[error("Exchange refused the credentials (HTTP 401)")]
    Unauthorized,
    #[error("cannot get an OAuth2 token: {0}")]
    Token(String),
    #[error("HTTP {status}: {excerpt}")]
    Http { status: u16, excerpt: String },
    #[error("cannot reach Exchange: {0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Response(#[from] ResponseError),
    #[error("{code}: {message}")]
    Failed { code: String, message: String },
    #[error("stopped")]
    Cancelled,
}

impl EwsError {
    /// The error for a response message whose class is Error.
    pub fn from_status(status: Status) -> Self {
        if status.code == "ErrorServerBusy" {
            return EwsError::Busy(clamp_wait(status.back_off));
        }
        EwsError::Failed {
            code: status.code,
            message: status.message,
        }
    }

    /// The EWS response code, when the error carries one.
    pub fn code(&self) -> Option<&str> {
        match self {
            EwsError::Failed { code, .. } => Some(code),
            EwsError::Response(ResponseError::Fault { code, .. }) => Some(code),
            _ => None,
        }
    }

    /// Errors worth retrying as they are (the network, a broken or truncated
    /// answer, a server error); anything else needs a different request.
    pub fn is_transient(&self) -> bool {
        match self {
            EwsError::Transport(_) | EwsError::Timeout(_) | EwsError::Busy(_) => true,
            EwsError::Response(ResponseError::Fault { .. }) => false,
            EwsError::Response(_) => true,
            EwsError::Http { status, .. } => *status >= 500,
            EwsError::Failed { code, .. } => matches!(
                code.as_str(),
                "ErrorInternalServerTransientError"
                    | "ErrorMailboxStoreUnavailable"
                    | "ErrorMailboxMoveInProgress"
                    | "ErrorConnectionFailed"
                    | "ErrorTimeoutExpired"
                    | "ErrorReadEventsFailed"
                    | "ErrorTooManyObjectsOpened"
                    | "ErrorProxiedSubscriptionCallFailure"
                    | "ErrorInternalServerError"
            ),
            EwsError::Unauthorized | EwsError::Token(_) | EwsError::Cancelled => false,
        }
    }
}

fn clamp_wait(wait: Option<Duration>) -> Duration {
    wait.unwrap_or(DEFAULT_BUSY_WAIT).min(MAX_BUSY_WAIT)
}

/// The affinity headers of one request (PROTOCOL.md §1.2).
#[derive(Debug, Clone, Default)]
pub struct Affinity {
    /// `X-AnchorMailbox`: the group's anchor (or the mailbox itself).
    pub anchor: Option<String>,
    /// `X-PreferServerAffinity: true` (Subscribe and GetStreamingEvents).
    pub prefer_server_affinity: bool,
    /// The `X-BackEndOverrideCookie` value to echo.
    pub cookie: Option<String>,
}

/// A successful response: its SOAP body element and any override cookie set.
#[derive(Debug)]
pub struct Answer {
    pub body: Element,
    pub backend_cookie: Option<String>,
}

/// A cheap, cloneable EWS client.
#[derive(Clone)]
pub struct Ews {
    inner: Arc<Inner>,
}

struct Inner {
    calls: reqwest::Client,
    streams: reqwest::Client,
    url: String,
    version: String,
    auth: Auth,
    request_timeout: Duration,
    /// The current OAuth2 access token. A std mutex: it is only held to copy
    /// or replace the string, never across an await.
    token: Mutex<Option<String>>,
    /// Serialises token refreshes so that many mailboxes hitting 401 together
    /// fetch one new token, not one each.
    refreshing: tokio::sync::Mutex<()>,
}

impl Ews {
    pub fn new(config: &EwsConfig) -> Result<Self, EwsError> {
        let build = |builder: reqwest::ClientBuilder| {
            builder
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .build()
                .map_err(|e| EwsError::Transport(format!("cannot build the HTTP client: {e}")))
        };
        Ok(Self {
            inner: Arc::new(Inner {
                calls: build(reqwest::Client::builder())?,
                streams: build(
                    reqwest::Client::builder()
                        .pool_max_idle_per_host(0)
                        .http1_only(),
                )?,
                url: config.url.clone(),
                version: config.version.clone(),
                auth: config.auth.clone(),
                request_timeout: config.request_timeout,
                token: Mutex::new(None),
                refreshing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// One request/response operation. `body` is the operation element.
    pub async fn call(
        &self,
        impersonate: Option<&str>,
        affinity: &Affinity,
        body: &str,
    ) -> Result<Answer, EwsError> {
        let envelope = messages::envelope(&self.inner.version, impersonate, body);
        let response = self.send(false, &envelope, affinity).await?;
        let cookie = backend_cookie(response.headers());
        let bytes = tokio::time::timeout(self.inner.request_timeout, response.bytes())
            .await
            .map_err(|_| EwsError::Timeout(self.inner.request_timeout))?
            .map_err(|e| EwsError::Transport(error_chain(&e)))?;
        let body = parse_body(&bytes)?;
        Ok(Answer {
            body,
            backend_cookie: cookie,
        })
    }

    /// Opens GetStreamingEvents and returns the response once its status is
    /// 200; the caller reads the body as it arrives.
    pub async fn open_stream(
        &self,
        impersonate: Option<&str>,
        affinity: &Affinity,
        body: &str,
    ) -> Result<reqwest::Response, EwsError> {
        let envelope = messages::envelope(&self.inner.version, impersonate, body);
        self.send(true, &envelope, affinity).await
    }

    /// POSTs an envelope, refreshing an OAuth2 token once on 401, and maps
    /// non-200 answers to errors.
    async fn send(
        &self,
        stream: bool,
        envelope: &str,
        affinity: &Affinity,
    ) -> Result<reqwest::Response, EwsError> {
        let mut refreshed = false;
        loop {
            let token = self.token(false).await?;
            let client = if stream {
                &self.inner.streams
            } else {
                &self.inner.calls
            };
            let mut request = client
                .post(&self.inner.url)
                .header("Content-Type", "text/xml; charset=utf-8")
                .header("Accept", "text/xml")
                .body(envelope.to_owned());
            if let Some(anchor) = &affinity.anchor {
                request = request.header("X-AnchorMailbox", anchor);
            }
            if affinity.prefer_server_affinity {
                request = request.header("X-PreferServerAffinity", "true");
            }
            if let Some(cookie) = &affinity.cookie {
                request = request.header("Cookie", format!("{BACKEND_OVERRIDE_COOKIE}={cookie}"));
            }
            request = match (&self.inner.auth, token) {
                (Auth::Basic { username, password }, _) => {
                    request.basic_auth(username, Some(password))
                }
                (Auth::Bearer { token }, _) => request.bearer_auth(token),
                (Auth::OAuth2 { .. }, Some(token)) => request.bearer_auth(token),
                _ => request,
            };
            let sent = tokio::time::timeout(self.inner.request_timeout, request.send()).await;
            let response = match sent {
                Err(_) => return Err(EwsError::Timeout(self.inner.request_timeout)),
                Ok(Err(e)) => return Err(EwsError::Transport(error_chain(&e))),
                Ok(Ok(response)) => response,
            };
            match response.status() {
                StatusCode::OK => return Ok(response),
                StatusCode::UNAUTHORIZED
                    if matches!(self.inner.auth, Auth::OAuth2 { .. }) && !refreshed =>
                {
                    info!("EWS answered 401; refreshing the OAuth2 token once");
                    refreshed = true;
                    self.token(true).await?;
                    continue;
                }
                StatusCode::UNAUTHORIZED => return Err(EwsError::Unauthorized),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                    let wait = retry_after(response.headers());
                    return Err(EwsError::Busy(clamp_wait(wait)));
                }
                status => {
                    let bytes = tokio::time::timeout(self.inner.request_timeout, response.bytes())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    // A SOAP fault (HTTP 500): ErrorServerBusy and schema errors.
                    match parse_body(&bytes) {
                        Err(busy @ EwsError::Busy(_)) => return Err(busy),
                        Err(fault @ EwsError::Response(ResponseError::Fault { .. })) => {
                            return Err(fault);
                        }
                        _ => {}
                    }
                    return Err(EwsError::Http {
                        status: status.as_u16(),
                        excerpt: String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)])
                            .into_owned(),
                    });
                }
            }
        }
    }

    /// The OAuth2 access token (fetched when missing or when `refresh`).
    async fn token(&self, refresh: bool) -> Result<Option<String>, EwsError> {
        let Auth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
        } = &self.inner.auth
        else {
            return Ok(None);
        };
        let cached = self.cached_token();
        if !refresh && cached.is_some() {
            return Ok(cached);
        }
        let _guard = self.inner.refreshing.lock().await;
        // Someone else may have refreshed while this task waited.
        let now_cached = self.cached_token();
        if now_cached.is_some() && now_cached != cached {
            return Ok(now_cached);
        }
        if !refresh && now_cached.is_some() {
            return Ok(now_cached);
        }
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", client_id)
            .append_pair("client_secret", client_secret)
            .append_pair("scope", scope)
            .finish();
        let response = tokio::time::timeout(
            self.inner.request_timeout,
            self.inner
                .calls
                .post(token_url)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(form)
                .send(),
        )
        .await
        .map_err(|_| EwsError::Token(format!("{token_url} did not answer")))?
        .map_err(|e| EwsError::Token(error_chain(&e)))?;
        let status = response.status();
        let body: Bytes = response
            .bytes()
            .await
            .map_err(|e| EwsError::Token(error_chain(&e)))?;
        if !status.is_success() {
            return Err(EwsError::Token(format!(
                "{token_url} answered HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)])
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            access_token: String,
        }
        let token: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| EwsError::Token(format!("{token_url} sent no access_token: {e}")))?;
        debug!("fetched an OAuth2 access token");
        if let Ok(mut slot) = self.inner.token.lock() {
            *slot = Some(token.access_token.clone());
        }
        Ok(Some(token.access_token))
    }

    fn cached_token(&self) -> Option<String> {
        self.inner.token.lock().ok().and_then(|slot| slot.clone())
    }
}

fn parse_body(bytes: &[u8]) -> Result<Element, EwsError> {
    match messages::body(bytes) {
        Ok(body) => Ok(body),
        Err(ResponseError::Fault {
            code,
            back_off,
            message,
        }) if code == "ErrorServerBusy" => {
            let _ = message;
            Err(EwsError::Busy(clamp_wait(back_off)))
        }
        Err(error) => Err(EwsError::Response(error)),
    }
}

/// The value of `Set-Cookie: X-BackEndOverrideCookie=…`, if any.
fn backend_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let pair = v.split(';').next()?.trim();
            let (name, value) = pair.split_once('=')?;
            (name.eq_ignore_ascii_case(BACKEND_OVERRIDE_COOKIE)).then(|| value.to_owned())
        })
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_retry_after_and_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.append("set-cookie", "exchangecookie=abc; path=/".parse().unwrap());
        headers.append(
            "set-cookie",
            "X-BackEndOverrideCookie=MBX1.example~123; path=/; secure; HttpOnly"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            backend_cookie(&headers).as_deref(),
            Some("MBX1.example~123")
        );
    }
}
