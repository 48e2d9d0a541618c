//! The webhook binding (http://, https://): POST a CloudEvents 1.0 JSON body
//! (type = contract.operation, data = the payload as JSON), signed per the
//! Standard Webhooks specification when the subscription has a secret.
//! 2xx is success, 410 Gone ends the subscription, anything else is retried.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use thiserror::Error;

use super::{BindingError, BindingOptions, CallOutcome, causes};
use crate::{
    broker::{ContractRegistry, Event, transcode},
    store::ClaimedDelivery,
};

/// Standard Webhooks headers.
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";
const MIN_SECRET_BYTES: usize = 24;
const MAX_SECRET_BYTES: usize = 64;

/// How much of an error response body is kept as the delivery's last error.
const ERROR_BODY_BYTES: usize = 200;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    #[error(
        "a webhook secret has the form whsec_<base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes>"
    )]
    Malformed,
}

/// The key bytes of a `whsec_<base64>` secret.
pub fn parse_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Malformed)?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| SecretError::Malformed)?;
    if (MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
        Ok(key)
    } else {
        Err(SecretError::Malformed)
    }
}

/// The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The start of an error answer's body, reading no more of it than is kept.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    text.chars().take(ERROR_BODY_BYTES).collect()
}

pub struct WebhookBinding {
    client: reqwest::Client,
    registry: Arc<ContractRegistry>,
}

impl WebhookBinding {
    pub fn new(
        registry: Arc<ContractRegistry>,
        options: &BindingOptions,
        extra_roots: Option<&[u8]>,
    ) -> Result<Self, BindingError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.call_timeout)
            // A redirect would turn the POST into a bodiless GET whose 2xx looks like
            // a delivery; a moved subscriber must be subscribed at its new address.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_roots {
            for certificate in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| BindingError::BadRoots(e.to_string()))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|e| BindingError::HttpClient(e.to_string()))?;
        Ok(Self { client, registry })
    }

    pub async fn deliver(&self, url: &Url, delivery: &ClaimedDelivery) -> CallOutcome {
        let event = delivery.event.event();
        let body = match self.cloud_event(event) {
            Ok(body) => body,
            Err(error) => return CallOutcome::Failed(error),
        };
        let timestamp = crate::store::now_micros() / 1_000_000;
        let mut request = self
            .client
            .post(url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents+json",
            )
            .header(WEBHOOK_ID, &event.id)
            .header(WEBHOOK_TIMESTAMP, timestamp.to_string());
        if let Some(secret) = &delivery.secret {
            match parse_secret(secret) {
                Ok(key) => {
                    request =
                        request.header(WEBHOOK_SIGNATURE, sign(&key, &event.id, timestamp, &body));
                }
                Err(error) => return CallOutcome::Failed(format!("stored secret: {error}")),
            }
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(error) => return CallOutcome::Failed(format!("{error}{}", causes(&error))),
        };
        let status = response.status();
        if status.is_success() {
            return CallOutcome::Delivered;
        }
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("none given")
                .to_owned();
            return CallOutcome::Failed(format!(
                "HTTP {status}: redirects are not followed; subscribe the new address \
                 instead (Location: {location})"
            ));
        }
        let excerpt = body_excerpt(response).await;
        let message = format!("HTTP {status}: {excerpt}");
        if status == StatusCode::GONE {
            CallOutcome::Gone(message)
        } else {
            CallOutcome::Failed(message)
        }
    }

    /// The structured-mode CloudEvents 1.0 JSON body of an event.
    fn cloud_event(&self, event: &Event) -> Result<Vec<u8>, String> {
        let descriptor = self
            .registry
            .payload_type(&event.contract, &event.operation)
            .map_err(|e| e.to_string())?;
        let data = transcode::payload_to_json(&descriptor, &event.payload)?;
        let mut body = Map::new();
        body.insert("specversion".into(), json!("1.0"));
        body.insert("id".into(), json!(event.id));
        let source = if event.source.is_empty() {
            "herald"
        } else {
            &event.source
        };
        body.insert("source".into(), json!(source));
        body.insert(
            "type".into(),
            json!(format!("{}.{}", event.contract, event.operation)),
        );
        body.insert(
            "time".into(),
            json!(prost_types::Timestamp::from(event.time).to_string()),
        );
        body.insert("datacontenttype".into(), json!("application/json"));
        // Publisher attributes whose names are valid CloudEvents extension
        // names become extensions; others are left out.
        for (name, value) in &event.attributes {
            if is_extension_name(name) && !body.contains_key(name) && name != "data" {
                body.insert(name.clone(), json!(value));
            }
        }
        body.insert("data".into(), data);
        serde_json::to_vec(&Value::Object(body)).map_err(|e| e.to_string())
    }
}

/// CloudEvents extension names: lower-case ASCII letters and digits, at most 20.
fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_whsec_base64_of_a_sensible_length() {
        let good = format!("whsec_{}", STANDARD.encode([7u8; 32]));
        assert_eq!(parse_secret(&good), Ok(vec![7u8; 32]));
        for bad in [
            "secret",
            "whsec_",
            "whsec_not base64!",
            &format!("whsec_{}", STANDARD.encode([1u8; 8])),
            &format!("whsec_{}", STANDARD.encode([1u8; 100])),
        ] {
            assert_eq!(parse_secret(bad), Err(SecretError::Malformed), "{bad}");
        }
    }

    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        // The example of the Standard Webhooks specification.
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
