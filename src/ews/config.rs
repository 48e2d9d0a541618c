//! `herald ews --config FILE`: the adapter's TOML configuration.
//!
//! The keys are a documented interface (see README.md). Unknown keys and bad
//! values stop start-up with one error that names the key and what is allowed.
//! Secrets never live in the file: it names the environment variables that
//! hold them (`password_env`, `token_env`, `client_secret_env`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::messages::{EventKind, FolderRef, ItemProperty};

pub const DEFAULT_BROKER: &str = crate::config::DEFAULT_SERVER_URL;
pub const DEFAULT_VERSION: &str = "Exchange2013_SP1";
/// Exchange's limit of subscriptions per GetStreamingEvents connection.
pub const MAX_GROUP_SIZE: usize = 200;
const DEFAULT_SILENCE: Duration = Duration::from_secs(90);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(100);

/// RequestServerVersion values Exchange accepts (Types.xsd).
const VERSIONS: &[&str] = &[
    "Exchange2007",
    "Exchange2007_SP1",
    "Exchange2009",
    "Exchange2010",
    "Exchange2010_SP1",
    "Exchange2010_SP2",
    "Exchange2012",
    "Exchange2013",
    "Exchange2013_SP1",
    "Exchange2015",
    "Exchange2016",
    "V2015_10_05",
    "V2016_01_06",
    "V2016_04_13",
    "V2016_07_13",
    "V2016_10_10",
    "V2017_01_07",
    "V2017_04_14",
    "V2017_07_11",
];

/// DistinguishedFolderIdNameType (Types.xsd), in the schema's order.
const DISTINGUISHED_FOLDERS: &[&str] = &[
    "calendar",
    "contacts",
    "deleteditems",
    "drafts",
    "inbox",
    "journal",
    "notes",
    "outbox",
    "sentitems",
    "tasks",
    "msgfolderroot",
    "publicfoldersroot",
    "root",
    "junkemail",
    "searchfolders",
    "voicemail",
    "recoverableitemsroot",
    "recoverableitemsdeletions",
    "recoverableitemsversions",
    "recoverableitemspurges",
    "recoverableitemsdiscoveryholds",
    "archiveroot",
    "archivemsgfolderroot",
    "archivedeleteditems",
    "archiveinbox",
    "archiverecoverableitemsroot",
    "archiverecoverableitemsdeletions",
    "archiverecoverableitemsversions",
    "archiverecoverableitemspurges",
    "archiverecoverableitemsdiscoveryholds",
    "syncissues",
    "conflicts",
    "localfailures",
    "serverfailures",
    "recipientcache",
    "quickcontacts",
    "conversationhistory",
    "adminauditlogs",
    "todosearch",
    "mycontacts",
    "directory",
    "imcontactlist",
    "peopleconnect",
    "favorites",
    "mecontact",
    "personmetadata",
    "teamspaceactivity",
    "teamspacemessaging",
    "teamspaceworkitems",
    "scheduled",
    "orionnotes",
    "tagitems",
    "alltaggeditems",
    "externalcontacts",
    "teamchat",
    "teamchathistory",
    "yammerroot",
    "yammerinbound",
    "yammeroutbound",
    "yammerfeeds",
    "onedriveroot",
    "onedriverecylebin",
    "onedrivesystem",
    "onedrivevolume",
    "important",
    "starred",
    "archive",
];

/// Versions that know GetStreamingEvents (Exchange 2010 SP1 and later).
const PRE_STREAMING_VERSIONS: &[&str] = &[
    "Exchange2007",
    "Exchange2007_SP1",
    "Exchange2009",
    "Exchange2010",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path}{location}: {message}")]
    Parse {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("config file {path}: `{key}` {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Streaming,
    Pull,
    Push,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Streaming => "streaming",
            Mode::Pull => "pull",
            Mode::Push => "push",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    Basic,
    Bearer,
    Oauth2,
}

/// The file as written. Every key is optional except `url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    broker: Option<String>,
    url: Option<String>,
    version: Option<String>,
    mode: Option<Mode>,
    #[serde(default)]
    mailboxes: Vec<String>,
    account: Option<String>,
    folders: Option<Vec<String>>,
    #[serde(default)]
    all_folders: bool,
    event_types: Option<Vec<String>>,
    #[serde(default)]
    fetch: Vec<String>,
    state: Option<String>,
    source: Option<String>,
    request_timeout_seconds: Option<u64>,
    resync_minutes: Option<u64>,
    auth: Option<AuthFile>,
    #[serde(default)]
    streaming: StreamingFile,
    #[serde(default)]
    pull: PullFile,
    #[serde(default)]
    push: PushFile,
    #[serde(default)]
    retry: RetryFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    kind: AuthKind,
    username: Option<String>,
    password_env: Option<String>,
    token_env: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamingFile {
    connection_timeout_minutes: Option<u32>,
    group_size: Option<usize>,
    silence_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PullFile {
    interval_seconds: Option<u64>,
    timeout_minutes: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushFile {
    listen: Option<SocketAddr>,
    public_url: Option<String>,
    status_frequency_minutes: Option<u32>,
    resubscribe_after_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    initial_backoff_ms: Option<u64>,
    max_backoff_seconds: Option<u64>,
}

/// How the adapter authenticates to EWS, with the secrets read from the
/// environment.
#[derive(Clone)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password: String,
    },
    Bearer {
        token: String,
    },
    OAuth2 {
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Auth::None => write!(f, "None"),
            Auth::Basic { username, .. } => write!(f, "Basic({username})"),
            Auth::Bearer { .. } => write!(f, "Bearer"),
            Auth::OAuth2 {
                token_url,
                client_id,
                ..
            } => write!(f, "OAuth2({client_id} at {token_url})"),
        }
    }
}

/// One watched mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mailbox {
    /// SMTP address; the key of its state and the `mailbox` of its events.
    pub address: String,
    /// True when accessed by ExchangeImpersonation, false for the account's
    /// own mailbox.
    pub impersonate: bool,
}

impl Mailbox {
    /// The address to impersonate in SOAP headers, if any.
    pub fn impersonation(&self) -> Option<&str> {
        self.impersonate.then_some(self.address.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct StreamingConfig {
    pub connection_timeout_minutes: u32,
    pub group_size: usize,
    /// No byte for this long means the connection is dead.
    pub silence: Duration,
}

#[derive(Debug, Clone)]
pub struct PullConfig {
    pub interval: Duration,
    pub timeout_minutes: u32,
}

#[derive(Debug, Clone)]
pub struct PushConfig {
    pub listen: SocketAddr,
    pub public_url: String,
    pub status_frequency_minutes: u32,
    /// Recreate a subscription when nothing arrived for this long.
    pub resubscribe_after: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub initial: Duration,
    pub max: Duration,
}

/// The effective adapter settings.
#[derive(Debug, Clone)]
pub struct EwsConfig {
    pub broker: String,
    pub url: String,
    pub version: String,
    pub mode: Mode,
    pub mailboxes: Vec<Mailbox>,
    pub folders: Vec<FolderRef>,
    pub all_folders: bool,
    pub event_types: Vec<EventKind>,
    pub fetch: Vec<ItemProperty>,
    /// A database URL (sqlite:… or postgres:…).
    pub state: String,
    pub source: String,
    pub request_timeout: Duration,
    pub resync_interval: Duration,
    pub auth: Auth,
    pub streaming: StreamingConfig,
    pub pull: PullConfig,
    /// Present in push mode only.
    pub push: Option<PushConfig>,
    pub retry: RetryConfig,
}

impl EwsConfig {
    /// Reads and validates `path`, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(path, &text, |name| std::env::var(name).ok())
    }

    /// Validates `text` (the contents of `path`); `env` looks up secrets.
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    let source = text.lines().nth(line - 1).unwrap_or_default().trim();
                    format!(" line {line} (`{source}`)")
                }
                None => String::new(),
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                location,
                message: e.message().to_owned(),
            }
        })?;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };

        let url = file.url.ok_or_else(|| {
            invalid(
                "url",
                "is required: the EWS endpoint, e.g. https://mail.example.com/EWS/Exchange.asmx"
                    .into(),
            )
        })?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "url",
                format!("must be an http:// or https:// URL, got '{url}'"),
            ));
        }
        let broker = file.broker.unwrap_or_else(|| DEFAULT_BROKER.to_owned());
        if !(broker.starts_with("http://") || broker.starts_with("https://")) {
            return Err(invalid(
                "broker",
                format!("must be an http:// or https:// URL, got '{broker}'"),
            ));
        }
        let mode = file.mode.unwrap_or(Mode::Streaming);
        let version = file.version.unwrap_or_else(|| DEFAULT_VERSION.to_owned());
        if !VERSIONS.contains(&version.as_str()) {
            return Err(invalid(
                "version",
                format!(
                    "'{version}' is not a RequestServerVersion; allowed: {}",
                    VERSIONS.join(", ")
                ),
            ));
        }
        if mode == Mode::Streaming && PRE_STREAMING_VERSIONS.contains(&version.as_str()) {
            return Err(invalid(
                "version",
                format!(
                    "'{version}' has no streaming notifications (they need Exchange2010_SP1 or later); use mode = \"pull\" or a later version"
                ),
            ));
        }

        let auth = resolve_auth(file.auth, &env).map_err(|(key, message)| invalid(key, message))?;
        let mut mailboxes: Vec<Mailbox> = Vec::new();
        for address in &file.mailboxes {
            let address = address.trim().to_ascii_lowercase();
            if !address.contains('@') {
                return Err(invalid(
                    "mailboxes",
                    format!("'{address}' is not an SMTP address"),
                ));
            }
            if mailboxes.iter().any(|m| m.address == address) {
                return Err(invalid("mailboxes", format!("'{address}' is listed twice")));
            }
            mailboxes.push(Mailbox {
                address,
                impersonate: true,
            });
        }
        if mailboxes.is_empty() {
            let own = file.account.clone().or_else(|| match &auth {
                Auth::Basic { username, .. } if username.contains('@') => Some(username.clone()),
                _ => None,
            });
            let Some(address) = own else {
                return Err(invalid("mailboxes", "is empty, so the adapter watches the account's own mailbox: set `account` to that mailbox's SMTP address (or list mailboxes to impersonate)".into()));
            };
            mailboxes.push(Mailbox {
                address: address.to_ascii_lowercase(),
                impersonate: false,
            });
        }
        mailboxes.sort();

        if file.all_folders && file.folders.is_some() {
            return Err(invalid("folders", "cannot be combined with all_folders = true (Exchange subscribes either to a list or to every folder)".into()));
        }
        let folders = file.folders.unwrap_or_else(|| vec!["inbox".to_owned()]);
        if folders.is_empty() && !file.all_folders {
            return Err(invalid("folders", "is empty: name at least one distinguished folder (e.g. \"inbox\") or set all_folders = true".into()));
        }
        let mut distinguished: Vec<&'static str> = Vec::new();
        for name in &folders {
            // Exchange's names are lower case; accept "Inbox" for "inbox".
            let known = DISTINGUISHED_FOLDERS
                .iter()
                .find(|known| known.eq_ignore_ascii_case(name.trim()))
                .ok_or_else(|| {
                    invalid(
                        "folders",
                        format!(
                            "'{name}' is not a distinguished folder id; allowed: {}",
                            DISTINGUISHED_FOLDERS.join(", ")
                        ),
                    )
                })?;
            if distinguished.contains(known) {
                return Err(invalid("folders", format!("'{known}' is listed twice")));
            }
            distinguished.push(known);
        }
        let folders = if file.all_folders {
            Vec::new()
        } else {
            distinguished
                .into_iter()
                .map(|name| FolderRef::Distinguished(name.to_owned()))
                .collect()
        };

        let event_types = match file.event_types {
            None => EventKind::SUBSCRIBABLE.to_vec(),
            Some(names) if names.is_empty() => {
                return Err(invalid(
                    "event_types",
                    "is empty; omit it for every type".into(),
                ));
            }
            Some(names) => {
                let mut kinds = Vec::new();
                for name in names {
                    let kind = EventKind::from_operation(&name).ok_or_else(|| {
                        invalid(
                            "event_types",
                            format!(
                                "'{name}' is not an event type; allowed: {}",
                                allowed_event_types()
                            ),
                        )
                    })?;
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                kinds
            }
        };
        let mut fetch = Vec::new();
        for name in file.fetch {
            let property = ItemProperty::from_name(&name).ok_or_else(|| {
                invalid(
                    "fetch",
                    format!(
                        "'{name}' is not a property the adapter fetches; allowed: {}",
                        ItemProperty::ALL.map(|p| p.name()).join(", ")
                    ),
                )
            })?;
            if !fetch.contains(&property) {
                fetch.push(property);
            }
        }

        let state = match file.state {
            Some(url)
                if url.starts_with("sqlite:")
                    || url.starts_with("postgres:")
                    || url.starts_with("postgresql:") =>
            {
                url
            }
            Some(other) => {
                return Err(invalid(
                    "state",
                    format!(
                        "must be a database URL (sqlite://FILE or postgres://…), got '{other}'"
                    ),
                ));
            }
            None => default_state_url(path),
        };

        let streaming = StreamingConfig {
            connection_timeout_minutes: range(
                file.streaming.connection_timeout_minutes.unwrap_or(30),
                1,
                30,
            )
            .map_err(|m| invalid("streaming.connection_timeout_minutes", m))?,
            group_size: range(
                file.streaming.group_size.unwrap_or(MAX_GROUP_SIZE),
                1,
                MAX_GROUP_SIZE,
            )
            .map_err(|m| invalid("streaming.group_size", m))?,
            silence: match file.streaming.silence_seconds {
                None => DEFAULT_SILENCE,
                Some(s) => Duration::from_secs(
                    range(s, 1, 3600).map_err(|m| invalid("streaming.silence_seconds", m))?,
                ),
            },
        };
        let pull = PullConfig {
            interval: Duration::from_secs(
                range(file.pull.interval_seconds.unwrap_or(10), 1, 86_400)
                    .map_err(|m| invalid("pull.interval_seconds", m))?,
            ),
            timeout_minutes: range(file.pull.timeout_minutes.unwrap_or(30), 1, 1440)
                .map_err(|m| invalid("pull.timeout_minutes", m))?,
        };
        let push = match mode {
            Mode::Push => {
                let listen = file
                    .push
                    .listen
                    .ok_or_else(|| invalid("push.listen", "is required in push mode: the address of the notification listener, e.g. \"0.0.0.0:8443\"".into()))?;
                let public_url = file
                    .push
                    .public_url
                    .ok_or_else(|| invalid("push.public_url", "is required in push mode: the URL Exchange calls, e.g. \"https://herald.example.com/ews/notify\"".into()))?;
                if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
                    return Err(invalid(
                        "push.public_url",
                        format!("must be an http:// or https:// URL, got '{public_url}'"),
                    ));
                }
                let status_frequency_minutes =
                    range(file.push.status_frequency_minutes.unwrap_or(30), 1, 1440)
                        .map_err(|m| invalid("push.status_frequency_minutes", m))?;
                let resubscribe_after = match file.push.resubscribe_after_seconds {
                    Some(s) => Duration::from_secs(
                        range(s, 1, 172_800)
                            .map_err(|m| invalid("push.resubscribe_after_seconds", m))?,
                    ),
                    None => Duration::from_secs(2 * 60 * u64::from(status_frequency_minutes)),
                };
                Some(PushConfig {
                    listen,
                    public_url,
                    status_frequency_minutes,
                    resubscribe_after,
                })
            }
            _ => None,
        };
        let initial = file.retry.initial_backoff_ms.unwrap_or(1000);
        let max = file.retry.max_backoff_seconds.unwrap_or(300);
        let retry = RetryConfig {
            initial: Duration::from_millis(
                range(initial, 1, 600_000).map_err(|m| invalid("retry.initial_backoff_ms", m))?,
            ),
            max: Duration::from_secs(
                range(max, 1, 3600).map_err(|m| invalid("retry.max_backoff_seconds", m))?,
            ),
        };
        let request_timeout = match file.request_timeout_seconds {
            None => DEFAULT_REQUEST_TIMEOUT,
            Some(s) => Duration::from_secs(
                range(s, 1, 3600).map_err(|m| invalid("request_timeout_seconds", m))?,
            ),
        };
        let resync_interval = Duration::from_secs(
            60 * range(file.resync_minutes.unwrap_or(30), 1, 10_080)
                .map_err(|m| invalid("resync_minutes", m))?,
        );
        Ok(Self {
            broker,
            url,
            version,
            mode,
            mailboxes,
            folders,
            all_folders: file.all_folders,
            event_types,
            fetch,
            state,
            source: file.source.unwrap_or_else(|| "herald-ews".to_owned()),
            request_timeout,
            resync_interval,
            auth,
            streaming,
            pull,
            push,
            retry,
        })
    }
}

fn allowed_event_types() -> String {
    EventKind::SUBSCRIBABLE.map(|k| k.operation()).join(", ")
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(value: T, min: T, max: T) -> Result<T, String> {
    if value < min || value > max {
        return Err(format!("must be between {min} and {max}, got {value}"));
    }
    Ok(value)
}

/// `sqlite://<dir>/<stem>.state.db` beside the config file.
pub fn default_state_url(config: &Path) -> String {
    let dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("ews");
    format!(
        "sqlite://{}?mode=rwc",
        dir.join(format!("{stem}.state.db")).display()
    )
}

fn resolve_auth(
    auth: Option<AuthFile>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Auth, (&'static str, String)> {
    let Some(auth) = auth else {
        return Ok(Auth::None);
    };
    let secret = |key: &'static str,
                  name: &Option<String>|
     -> Result<String, (&'static str, String)> {
        let name = name
            .as_deref()
            .ok_or((key, "is required for this auth kind: the name of the environment variable that holds the secret".to_string()))?;
        env(name).filter(|v| !v.is_empty()).ok_or((
            key,
            format!("names the environment variable {name}, which is not set"),
        ))
    };
    let required = |key: &'static str, value: Option<String>, what: &str| {
        value.ok_or((key, format!("is required for this auth kind: {what}")))
    };
    Ok(match auth.kind {
        AuthKind::Basic => Auth::Basic {
            username: required("auth.username", auth.username, "the account name")?,
            password: secret("auth.password_env", &auth.password_env)?,
        },
        AuthKind::Bearer => Auth::Bearer {
            token: secret("auth.token_env", &auth.token_env)?,
        },
        AuthKind::Oauth2 => Auth::OAuth2 {
            token_url: token_url(required(
                "auth.token_url",
                auth.token_url,
                "the OAuth2 token endpoint",
            )?)?,
            client_id: required(
                "auth.client_id",
                auth.client_id,
                "the application (client) id",
            )?,
            client_secret: secret("auth.client_secret_env", &auth.client_secret_env)?,
            scope: auth
                .scope
                .unwrap_or_else(|| "https://outlook.office365.com/.default".to_owned()),
        },
    })
}

/// The OAuth2 token endpoint, if it is an http(s) URL with a host.
fn token_url(text: String) -> Result<String, (&'static str, String)> {
    let usable = reqwest::Url::parse(&text)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
    if !usable {
        return Err((
            "auth.token_url",
            format!(
                "must be an http:// or https:// URL, e.g. https://login.microsoftonline.com/TENANT/oauth2/v2.0/token, got '{text}'"
            ),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EwsConfig, ConfigError> {
        EwsConfig::parse(Path::new("/etc/herald/ews.toml"), text, |name| {
            (name == "PW").then(|| "secret".to_owned())
        })
    }

    #[test]
    fn defaults() {
        let config = parse(
            r#"url = "https://ex/EWS/Exchange.asmx"
               mailboxes = ["B@example.com", "a@example.com"]"#,
        )
        .unwrap();
        assert_eq!(config.mode, Mode::Streaming);
        assert_eq!(config.version, DEFAULT_VERSION);
        assert_eq!(config.broker, DEFAULT_BROKER);
        assert_eq!(
            config.folders,
            vec![FolderRef::Distinguished("inbox".into())]
        );
        assert_eq!(config.event_types.len(), 7);
        assert_eq!(config.mailboxes[0].address, "a@example.com");
        assert_eq!(config.streaming.group_size, 200);
        assert_eq!(config.state, "sqlite:///etc/herald/ews.state.db?mode=rwc");
    }

    #[test]
    fn errors_name_the_key_and_what_is_allowed() {
        let cases = [
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\nmodee = \"pull\"",
                "modee",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\nmode = \"poll\"",
                "streaming",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\nevent_types = [\"Nope\"]",
                "FreeBusyChanged",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\n[streaming]\nconnection_timeout_minutes = 45",
                "streaming.connection_timeout_minutes",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\n[auth]\nkind = \"basic\"\nusername = \"u\"\npassword_env = \"MISSING\"",
                "MISSING",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\n[auth]\nkind = \"basic\"\npassword = \"x\"",
                "password_env",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\nmode = \"push\"",
                "push.listen",
            ),
            (
                "url = \"http://x\"\nmailboxes=[\"a@b\"]\nfetch = [\"Body\"]",
                "Subject",
            ),
            ("mailboxes=[\"a@b\"]", "url"),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?} gave {error}");
        }
    }
}
