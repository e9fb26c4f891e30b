//! Errors of the cloud backends turned into [`StoreError`]s, summarised so that no secret leaves
//! the process.
//!
//! object_store (0.12) formats a failed request as `Error performing <METHOD> <url> in <time>[,
//! after N retries, ...] - <reason>`, where `<reason>` is `Server returned non-2xx status code:
//! <status>: <response body>`, `Server returned error response: <body>` or `HTTP error: <what>`,
//! wrapped in its own variants (`The operation lacked the necessary privileges to complete for
//! path <p>: ...`, `Generic S3 error: Error performing list request: ...`). The body is the
//! provider's whole error document: S3 echoes the access key id (`<AWSAccessKeyId>`), the string
//! to sign and the canonical request (with any session token) in SignatureDoesNotMatch; Azure
//! echoes the string it signed.
//!
//! Invariants:
//! - A message built here holds only the operation (HTTP method, or object_store's name for a
//!   compound request such as `list`), the HTTP status, the provider's error code and request id
//!   (each checked to be a plain token), and a fixed hint. A failure without a status (connection,
//!   timeout, credential provider) keeps object_store's description with every URL cut to
//!   scheme, host and path (no user info, no query string), `key=value` credentials masked, and
//!   the values of the credential environment variables removed.
//! - 401 and 403 carry a hint naming the credentials and the bucket policy; a 404 for a missing
//!   bucket (NoSuchBucket, ContainerNotFound) is an error with a hint, never "object not found",
//!   so a wrong bucket name cannot make `wal-fetch` report WAL as missing.
//! - A 4xx status other than 408 and 429 is not retryable.

use super::StoreError;
use object_store::Error as OsError;
use std::fmt;

pub(super) fn map_os_err(key: &str, e: OsError) -> StoreError {
    let summary = Summary::of(&e);
    match e {
        OsError::NotFound { .. } if !summary.bucket_missing() => StoreError::NotFound {
            key: key.to_string(),
        },
        OsError::AlreadyExists { .. } | OsError::Precondition { .. } => StoreError::AlreadyExists {
            key: key.to_string(),
        },
        other => {
            let retryable = !matches!(
                other,
                OsError::NotSupported { .. }
                    | OsError::NotImplemented
                    | OsError::PermissionDenied { .. }
                    | OsError::Unauthenticated { .. }
            ) && summary.retryable();
            StoreError::Io {
                key: key.to_string(),
                message: scrub_env_secrets(&summary.to_string()),
                retryable,
            }
        }
    }
}

/// What may be said about a failed storage request. `Display` prints one line, plus a `hint:`
/// line when there is advice.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    /// An HTTP method, or object_store's name for a compound request (`list`, `DeleteObjects`).
    pub op: Option<String>,
    pub status: Option<u16>,
    /// The status's reason phrase (`Forbidden`), when object_store printed one.
    pub reason: Option<String>,
    /// The provider's error code (`AccessDenied`, `SignatureDoesNotMatch`, `NoSuchBucket`).
    pub code: Option<String>,
    pub request_id: Option<String>,
    /// For a failure without an HTTP status: what happened, secrets removed.
    pub detail: Option<String>,
}

/// HTTP methods object_store sends.
const METHODS: [&str; 6] = ["GET", "PUT", "POST", "HEAD", "DELETE", "PATCH"];
/// object_store's names of requests that wrap another (`Error performing <name> request`).
const COMPOUND: [(&str, &str); 3] = [
    ("list request", "list"),
    ("DeleteObjects request", "DeleteObjects"),
    ("complete multipart request", "complete multipart"),
];
/// Longest detail kept for a failure without a status.
const MAX_DETAIL: usize = 300;
/// Longest part of a status-less error's text that is looked at.
const MAX_SCANNED: usize = 4096;

impl Summary {
    /// Summarises `e` from its variant and its text.
    pub fn of(e: &OsError) -> Summary {
        let implied = match e {
            OsError::PermissionDenied { .. } => Some(403),
            OsError::Unauthenticated { .. } => Some(401),
            OsError::NotFound { .. } => Some(404),
            _ => None,
        };
        // object_store's text leaves out the root cause of a transport failure (e.g. "Connection
        // refused"): add each cause the text does not already hold.
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            let t = c.to_string();
            if !text.contains(&t) {
                text.push_str(": ");
                text.push_str(&t);
            }
            cause = c.source();
        }
        Summary::parse(&text, implied)
    }

    /// Summarises object_store's text of an error; `implied` is the status its variant stands for
    /// (used when the text names none).
    pub fn parse(text: &str, implied: Option<u16>) -> Summary {
        let mut s = Summary {
            op: operation(text),
            ..Summary::default()
        };
        let body = if let Some(at) = text.find("status code: ") {
            let rest = &text[at + "status code: ".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            s.status = digits.parse().ok().filter(|_| digits.len() == 3);
            let after = &rest[digits.len()..];
            let (reason, body) = after.split_once(':').unwrap_or((after, ""));
            let reason = reason.trim();
            if !reason.is_empty()
                && reason.len() <= 40
                && reason.chars().all(|c| c.is_ascii_alphabetic() || c == ' ')
            {
                s.reason = Some(reason.to_string());
            }
            Some(body)
        } else {
            text.find("error response: ")
                .map(|at| &text[at + "error response: ".len()..])
        };
        match body {
            Some(body) => {
                s.code = error_code(body);
                s.request_id = request_id(body);
            }
            None => s.detail = Some(detail(text)).filter(|d| !d.trim().is_empty()),
        }
        if s.status.is_none() {
            s.status = implied;
        }
        s
    }

    /// The bucket (container) itself does not exist.
    pub fn bucket_missing(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("NoSuchBucket" | "ContainerNotFound")
        )
    }

    /// Whether repeating the request may help: not for a client error (4xx) other than 408
    /// (timeout) and 429 (slow down).
    pub fn retryable(&self) -> bool {
        !matches!(self.status, Some(s) if (400..500).contains(&s) && s != 408 && s != 429)
    }

    /// Advice for the operator, by error code first, then by status.
    pub fn hint(&self) -> Option<&'static str> {
        let by_code = match self.code.as_deref() {
            Some("InvalidAccessKeyId") => Some("the server does not know this access key id: check AWS_ACCESS_KEY_ID, and that AWS_ENDPOINT_URL names the provider the key belongs to"),
            Some("SignatureDoesNotMatch") => Some("the request signature does not match the access key id: check AWS_SECRET_ACCESS_KEY (and that this machine's clock is right)"),
            Some("ExpiredToken" | "TokenRefreshRequired" | "InvalidToken") => Some("the session token is expired or invalid: renew the temporary credentials (AWS_SESSION_TOKEN, the pod's role)"),
            Some("RequestTimeTooSkewed") => Some("this machine's clock is too far off the storage's: synchronise it (NTP)"),
            Some("AuthenticationFailed") => Some("Azure refused the credentials: check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or the SAS token / service principal)"),
            Some("NoSuchBucket" | "ContainerNotFound") => Some("the bucket named in --repo does not exist at this endpoint: create it, or fix the bucket name, AWS_REGION or AWS_ENDPOINT_URL"),
            Some("PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException") => Some("the bucket is in another region: set AWS_REGION to the bucket's region"),
            _ => None,
        };
        by_code.or(match self.status {
            Some(401 | 403) => Some("the storage refused the request: check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_KEY) and that the bucket policy or role allows listing, reading, writing and deleting under the repository's prefix"),
            Some(301 | 307) => Some("the bucket is in another region: set AWS_REGION to the bucket's region"),
            _ => None,
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(status) = self.status {
            parts.push(match &self.reason {
                Some(r) => format!("HTTP {status} {r}"),
                None => format!("HTTP {status}"),
            });
        }
        if let Some(c) = &self.code {
            parts.push(format!("code {c}"));
        }
        if let Some(r) = &self.request_id {
            parts.push(format!("request id {r}"));
        }
        if let Some(d) = &self.detail {
            parts.push(d.clone());
        }
        if parts.is_empty() {
            parts.push("request failed".into());
        }
        match &self.op {
            Some(op) => write!(f, "{op} failed: {}", parts.join(", "))?,
            None => write!(f, "{}", parts.join(", "))?,
        }
        if let Some(h) = self.hint() {
            write!(f, "\nhint: {h}")?;
        }
        Ok(())
    }
}

/// The request that failed: the compound request if one is named, else the innermost method.
fn operation(text: &str) -> Option<String> {
    let mut method = None;
    for (at, _) in text.match_indices("Error performing ") {
        let rest = &text[at + "Error performing ".len()..];
        if let Some((_, name)) = COMPOUND.iter().find(|(p, _)| rest.starts_with(p)) {
            return Some((*name).to_string());
        }
        let word = rest.split(' ').next().unwrap_or("");
        if METHODS.contains(&word) {
            method = Some(word.to_string());
        }
    }
    method
}

/// The provider's error code: `<Code>` of an XML error document (S3, GCS, Azure), or the
/// `error`/`status`/`reason` of a JSON one (GCS JSON API, OAuth token endpoints).
fn error_code(body: &str) -> Option<String> {
    if let Some(c) = xml_element(body, "Code") {
        return token(c, 64, false);
    }
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let e = v.get("error")?;
    let code = e.as_str().or_else(|| {
        e.get("status")
            .and_then(|s| s.as_str())
            .or_else(|| e.pointer("/errors/0/reason").and_then(|s| s.as_str()))
    })?;
    token(code, 64, false)
}

/// The request id: S3's `<RequestId>`, or the `RequestId:` line Azure puts in its message.
fn request_id(body: &str) -> Option<String> {
    if let Some(r) = xml_element(body, "RequestId") {
        return token(r, 128, true);
    }
    let at = body.find("RequestId:")?;
    let rest = body[at + "RequestId:".len()..].trim_start();
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '<' || c == '"')
        .unwrap_or(rest.len());
    token(&rest[..end], 128, true)
}

/// The text of the first `<name>…</name>` element.
fn xml_element<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(body[start..start + len].trim())
}

/// `s` if it is a plain identifier of at most `max` characters (letters, digits, `_ . -`, and
/// with `id` also `+ / = :`), else `None`: nothing else of a response body is ever kept.
fn token(s: &str, max: usize, id: bool) -> Option<String> {
    let ok = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(c, '_' | '.' | '-')
            || (id && matches!(c, '+' | '/' | '=' | ':'))
    };
    (!s.is_empty() && s.len() <= max && s.chars().all(ok)).then(|| s.to_string())
}

/// A failure without an HTTP status: object_store's reason after the request line (or the whole
/// text), URLs cut and credentials masked, at most [`MAX_DETAIL`] characters.
fn detail(text: &str) -> String {
    let reason = text
        .rfind("Error performing ")
        .and_then(|at| text[at..].find(" - ").map(|d| &text[at + d + 3..]))
        .unwrap_or(text);
    let reason = match reason.char_indices().nth(MAX_SCANNED) {
        Some((cut, _)) => &reason[..cut],
        None => reason,
    };
    let clean = mask_credential_pairs(&scrub_urls(reason));
    match clean.char_indices().nth(MAX_DETAIL) {
        Some((cut, _)) => format!("{}…", &clean[..cut]),
        None => clean,
    }
}

/// Every `scheme://…` URL cut to scheme, host and path: user info and query string dropped.
fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '<' | '>'))
            .unwrap_or(after.len());
        let url = after[..end].split(['?', '#']).next().unwrap_or("");
        let (authority, path) = url.split_at(url.find('/').unwrap_or(url.len()));
        out.push_str(authority.rsplit('@').next().unwrap_or(""));
        out.push_str(path);
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Names whose `name=value` (or `name: value` for `authorization`) carries a credential; a
/// name matches when it ends with one of these, ignoring case (`X-Amz-Signature`,
/// `client_secret`, `x-amz-security-token`).
const CREDENTIAL_NAMES: [&str; 10] = [
    "signature",
    "sig",
    "credential",
    "password",
    "secret",
    "token",
    "accountkey",
    "accesskeyid",
    "sharedaccesssignature",
    "authorization",
];

/// Query-string and header style credentials (`X-Amz-Signature=…`, `sig=…`, `password=…`,
/// `Authorization: …`) with their values replaced by `<redacted>`.
fn mask_credential_pairs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        // The next `=` or `:` that follows a credential name, and whether it is a header.
        let hit = rest.char_indices().find_map(|(i, c)| {
            if c != '=' && c != ':' {
                return None;
            }
            let before = rest[..i].trim_end_matches(' ');
            let start = before
                .rfind(|ch: char| !(ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_')))
                .map_or(0, |j| j + 1);
            let name = before[start..].to_ascii_lowercase();
            let header = name.ends_with("authorization");
            let named = !name.is_empty() && CREDENTIAL_NAMES.iter().any(|n| name.ends_with(n));
            (named && (c == '=' || header)).then_some((i, header))
        });
        let Some((i, header)) = hit else { break };
        out.push_str(&rest[..=i]);
        let value = &rest[i + 1..];
        let skip = value.len() - value.trim_start_matches(' ').len();
        let v = &value[skip..];
        // `Authorization: AWS4-HMAC-SHA256 Credential=…, Signature=…` runs to the line's end.
        let end = if header {
            v.find(['\n', '"', '<']).unwrap_or(v.len())
        } else {
            v.find(|c: char| c.is_whitespace() || matches!(c, '&' | ',' | ';' | ')' | '"' | '<'))
                .unwrap_or(v.len())
        };
        out.push_str(&value[..skip]);
        out.push_str("<redacted>");
        rest = &v[end..];
    }
    out.push_str(rest);
    out
}

/// Environment variables whose values are credentials: never printed, whatever the text.
const SECRET_VARS: [&str; 9] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
];

/// `text` with the value of every [`SECRET_VARS`] variable set here (8 characters or longer,
/// so a short test value does not blank out common words) replaced by `<redacted>`.
fn scrub_env_secrets(text: &str) -> String {
    let values: Vec<String> = SECRET_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .collect();
    scrub_values(text, &values)
}

fn scrub_values(text: &str, values: &[String]) -> String {
    values
        .iter()
        .filter(|v| v.len() >= 8)
        .fold(text.to_string(), |t, v| t.replace(v.as_str(), "<redacted>"))
}

#[cfg(test)]
mod tests;
