//! Persistent subscriber addresses, and the binding each one implies. The
//! scheme decides how the broker reaches the subscriber, as WCF bindings did.

use std::{fmt, path::PathBuf};

use reqwest::Url;
use thiserror::Error;

/// The schemes Herald accepts, for error messages.
pub const ACCEPTED: &str = "grpc://host:port (gRPC, h2c), grpcs://host:port (gRPC over TLS), \
     unix:///path/to.sock (gRPC over a Unix socket), http://… or https://… (webhook)";

/// Longest address accepted.
pub const MAX_ADDRESS_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// gRPC over cleartext HTTP/2; `endpoint` is `http://host:port`.
    Grpc { endpoint: String },
    /// gRPC over TLS; `endpoint` is `https://host:port`, `host` the TLS name.
    Grpcs { endpoint: String, host: String },
    /// gRPC over a Unix domain socket.
    Unix { path: PathBuf },
    /// A webhook: an HTTP POST of a CloudEvents JSON body.
    Webhook { url: Url },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AddressError {
    #[error("address is empty; accepted: {ACCEPTED}")]
    Empty,
    #[error("address is {0} bytes; at most {MAX_ADDRESS_LEN} are accepted")]
    TooLong(usize),
    #[error("address '{address}' does not parse ({reason}); accepted: {ACCEPTED}")]
    Unparsable { address: String, reason: String },
    #[error(
        "address '{address}' has scheme '{scheme}', which Herald cannot call; accepted: {ACCEPTED}"
    )]
    UnsupportedScheme { address: String, scheme: String },
    #[error("address '{address}' needs {what}; e.g. {example}")]
    Incomplete {
        address: String,
        what: &'static str,
        example: &'static str,
    },
}

impl Address {
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        if text.trim().is_empty() {
            return Err(AddressError::Empty);
        }
        if text.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong(text.len()));
        }
        let url = Url::parse(text).map_err(|e| AddressError::Unparsable {
            address: text.to_owned(),
            reason: e.to_string(),
        })?;
        let incomplete = |what, example| AddressError::Incomplete {
            address: text.to_owned(),
            what,
            example,
        };
        match url.scheme() {
            scheme @ ("grpc" | "grpcs") => {
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| incomplete("a host", "grpc://orders.internal:50051"))?;
                let port = url
                    .port()
                    .ok_or_else(|| incomplete("a port", "grpc://orders.internal:50051"))?;
                if !matches!(url.path(), "" | "/") || url.query().is_some() {
                    return Err(incomplete(
                        "no path or query (the broker calls /<contract>/<operation>)",
                        "grpc://orders.internal:50051",
                    ));
                }
                if scheme == "grpc" {
                    Ok(Address::Grpc {
                        endpoint: format!("http://{host}:{port}"),
                    })
                } else {
                    Ok(Address::Grpcs {
                        endpoint: format!("https://{host}:{port}"),
                        host: host.trim_matches(['[', ']']).to_owned(),
                    })
                }
            }
            "unix" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || url.path().len() <= 1 {
                    return Err(incomplete(
                        "an absolute socket path after unix://",
                        "unix:///run/orders.sock",
                    ));
                }
                Ok(Address::Unix {
                    path: PathBuf::from(url.path()),
                })
            }
            "http" | "https" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(incomplete("a host", "https://hooks.example.com/herald"));
                }
                Ok(Address::Webhook { url })
            }
            other => Err(AddressError::UnsupportedScheme {
                address: text.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }

    pub fn is_webhook(&self) -> bool {
        matches!(self, Address::Webhook { .. })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Grpc { endpoint } => {
                write!(f, "grpc://{}", endpoint.trim_start_matches("http://"))
            }
            Address::Grpcs { endpoint, .. } => {
                write!(f, "grpcs://{}", endpoint.trim_start_matches("https://"))
            }
            Address::Unix { path } => write!(f, "unix://{}", path.display()),
            Address::Webhook { url } => write!(f, "{url}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scheme_maps_to_its_binding() {
        assert_eq!(
            Address::parse("grpc://127.0.0.1:5000"),
            Ok(Address::Grpc {
                endpoint: "http://127.0.0.1:5000".into()
            })
        );
        assert!(matches!(
            Address::parse("grpcs://orders.example.com:443"),
            Ok(Address::Grpcs { host, .. }) if host == "orders.example.com"
        ));
        assert_eq!(
            Address::parse("unix:///run/herald/orders.sock"),
            Ok(Address::Unix {
                path: "/run/herald/orders.sock".into()
            })
        );
        assert!(Address::parse("https://hooks.example.com/x?y=1").is_ok_and(|a| a.is_webhook()));
        assert!(Address::parse("http://[::1]:8080/").is_ok_and(|a| a.is_webhook()));
    }

    #[test]
    fn malformed_addresses_say_what_is_accepted() {
        for bad in [
            "",
            "orders:5000",
            "ftp://x:1",
            "grpc://:5000",
            "grpc://host",
            "grpc://host:5000/path",
            "unix://relative.sock",
            "unix:///",
            "http://",
            "not an address",
        ] {
            let error = Address::parse(bad).expect_err(bad);
            let message = error.to_string();
            assert!(
                message.contains("grpc://") || message.contains("e.g."),
                "{bad}: {message}"
            );
        }
        assert!(matches!(
            Address::parse(&format!("http://h/{}", "x".repeat(3000))),
            Err(AddressError::TooLong(_))
        ));
    }
}
