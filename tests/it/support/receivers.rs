//! Real persistent subscribers for tests: a tonic server implementing the
//! Orders contract (over TCP, TLS or a Unix socket), and an axum webhook
//! receiver that checks Standard Webhooks signatures on its own.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::HeaderMap,
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{PATIENCE, orders};

/// What a receiver does with the next calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// Fail with UNAVAILABLE (gRPC) or HTTP 503 (webhook).
    Fail,
    /// Never answer.
    Hang,
    /// HTTP 410 Gone (webhook only).
    Gone,
    /// HTTP 303 See Other to a URL that answers a GET with 200 (webhook only).
    Redirect,
    /// Accept, after this long.
    Slow(Duration),
}

/// One call a receiver accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub event_id: String,
    pub operation: String,
    /// gRPC: the decoded Order. Webhook: the CloudEvent JSON.
    pub order: Option<orders::Order>,
    pub cloud_event: Option<serde_json::Value>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug)]
struct Shared {
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
    /// Every call, accepted or not.
    calls: Mutex<u64>,
    count: watch::Sender<usize>,
    /// Webhooks: the secret signatures must verify against.
    secret: Option<Vec<u8>>,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    shared: Arc<Shared>,
    stop: CancellationToken,
    pub address: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Receiver {
    fn new_shared(secret: Option<Vec<u8>>) -> Arc<Shared> {
        Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::Accept),
            received: Mutex::new(Vec::new()),
            calls: Mutex::new(0),
            count: watch::channel(0).0,
            secret,
        })
    }

    /// An Orders gRPC server on 127.0.0.1 (grpc://).
    pub async fn grpc() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::grpc_on(listener, None).await
    }

    /// An Orders gRPC server on a given listener, optionally with TLS (grpcs://).
    pub async fn grpc_on(
        listener: TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Self {
        let addr = listener.local_addr().expect("addr");
        let scheme = if tls.is_some() { "grpcs" } else { "grpc" };
        let host = if tls.is_some() {
            "localhost".to_owned()
        } else {
            addr.ip().to_string()
        };
        let shared = Self::new_shared(None);
        let stop = CancellationToken::new();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("server TLS");
        }
        let router = builder.add_service(orders::orders_server::OrdersServer::new(OrdersImpl(
            shared.clone(),
        )));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()));
        Self {
            shared,
            stop,
            address: format!("{scheme}://{host}:{}", addr.port()),
        }
    }

    /// An Orders gRPC server on a Unix socket (unix://).
    pub async fn unix(path: &Path) -> Self {
        let listener = tokio::net::UnixListener::bind(path).expect("bind unix socket");
        let shared = Self::new_shared(None);
        let stop = CancellationToken::new();
        let router = tonic::transport::Server::builder().add_service(
            orders::orders_server::OrdersServer::new(OrdersImpl(shared.clone())),
        );
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()));
        Self {
            shared,
            stop,
            address: format!("unix://{}", path.display()),
        }
    }

    /// A webhook receiver on 127.0.0.1 (http://), checking signatures with
    /// `secret` (whsec_…) when given.
    pub async fn webhook(secret: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shared, stop) = Self::webhook_parts(secret);
        let app = webhook_router(shared.clone());
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        Self {
            shared,
            stop,
            address: format!("http://{addr}/hooks/orders"),
        }
    }

    /// A webhook receiver over TLS (https://localhost:PORT).
    pub async fn webhook_tls(tls: Arc<tokio_rustls::rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (shared, stop) = Self::webhook_parts(None);
        let app = webhook_router(shared.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let shutdown = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Self {
            shared,
            stop,
            address: format!("https://localhost:{}/hooks/orders", addr.port()),
        }
    }

    fn webhook_parts(secret: Option<&str>) -> (Arc<Shared>, CancellationToken) {
        let key = secret.map(|s| {
            STANDARD
                .decode(s.strip_prefix("whsec_").expect("whsec_ secret"))
                .expect("base64 secret")
        });
        (Self::new_shared(key), CancellationToken::new())
    }

    pub fn behave(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().expect("lock") = behaviour;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("lock").clone()
    }

    pub fn received_ids(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.event_id).collect()
    }

    /// Calls that reached the receiver, accepted or not.
    pub fn calls(&self) -> u64 {
        *self.shared.calls.lock().expect("lock")
    }

    /// Waits until at least `n` calls were accepted.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        self.wait_for_within(n, PATIENCE).await
    }

    pub async fn wait_for_within(&self, n: usize, patience: Duration) -> Vec<Received> {
        let mut count = self.shared.count.subscribe();
        let reached = tokio::time::timeout(patience, count.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "{} received {} of {n} deliveries in time",
            self.address,
            self.received().len()
        );
        self.received()
    }

    /// Waits until `n` calls (accepted or not) reached the receiver.
    pub async fn wait_for_calls(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.calls() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} got {} of {n} calls",
                self.address,
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Shared {
    /// Counts the call and says what to do with it.
    fn behaviour(&self) -> Behaviour {
        *self.calls.lock().expect("lock") += 1;
        self.behaviour.lock().expect("lock").clone()
    }

    fn record(&self, received: Received) {
        let mut all = self.received.lock().expect("lock");
        all.push(received);
        self.count.send_replace(all.len());
    }
}

struct OrdersImpl(Arc<Shared>);

impl OrdersImpl {
    async fn handle(
        &self,
        operation: &str,
        request: Request<orders::Order>,
    ) -> Result<Response<()>, Status> {
        match self.0.behaviour() {
            Behaviour::Accept => {}
            Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
            Behaviour::Fail | Behaviour::Gone | Behaviour::Redirect => {
                return Err(Status::unavailable("the test receiver is failing"));
            }
            Behaviour::Hang => std::future::pending::<()>().await,
        }
        let headers = request
            .metadata()
            .iter()
            .filter_map(|entry| match entry {
                tonic::metadata::KeyAndValueRef::Ascii(key, value) => Some((
                    key.to_string(),
                    value.to_str().unwrap_or_default().to_owned(),
                )),
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect::<Vec<_>>();
        let event_id = headers
            .iter()
            .find(|(k, _)| k == "herald-event-id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        self.0.record(Received {
            event_id,
            operation: operation.to_owned(),
            order: Some(request.into_inner()),
            cloud_event: None,
            headers,
        });
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl orders::orders_server::Orders for OrdersImpl {
    async fn placed(&self, request: Request<orders::Order>) -> Result<Response<()>, Status> {
        self.handle("Placed", request).await
    }
    async fn shipped(&self, request: Request<orders::Order>) -> Result<Response<()>, Status> {
        self.handle("Shipped", request).await
    }
    async fn cancelled(&self, request: Request<orders::Order>) -> Result<Response<()>, Status> {
        self.handle("Cancelled", request).await
    }
}

fn webhook_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/hooks/orders", post(webhook))
        .route("/hooks/moved", get(moved))
        .with_state(shared)
}

/// Where `Behaviour::Redirect` sends a caller: a GET here counts as a call, not as a
/// received event, and answers 200.
async fn moved(State(shared): State<Arc<Shared>>) -> StatusCode {
    *shared.calls.lock().expect("calls") += 1;
    StatusCode::OK
}

async fn webhook(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    match shared.behaviour() {
        Behaviour::Accept => {}
        Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
        Behaviour::Fail => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Behaviour::Gone => return StatusCode::GONE.into_response(),
        Behaviour::Redirect => {
            return (StatusCode::SEE_OTHER, [("location", "/hooks/moved")]).into_response();
        }
        Behaviour::Hang => std::future::pending::<()>().await,
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if let Some(key) = &shared.secret {
        // Standard Webhooks: HMAC-SHA256 over "id.timestamp.body", base64, "v1," prefix.
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("key");
        mac.update(format!("{}.{}.", header("webhook-id"), header("webhook-timestamp")).as_bytes());
        mac.update(&body);
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        if !header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
        {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let operation = event["type"]
        .as_str()
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or_default()
        .to_owned();
    shared.record(Received {
        event_id: header("webhook-id"),
        operation,
        order: None,
        cloud_event: Some(event),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
    });
    StatusCode::NO_CONTENT.into_response()
}

/// A self-signed certificate for `localhost`: (certificate PEM, key PEM).
pub fn localhost_certificate() -> (String, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}
