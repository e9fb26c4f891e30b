//! Over 500 lines because it holds the providers' real error documents verbatim.
//!
//! The summariser on errors shaped exactly as object_store 0.12 prints them (client/retry.rs,
//! lib.rs, aws/client.rs) around the providers' real error documents.

use super::*;

const KEY_ID: &str = "AKIAIOSFODNN7LEAKTEST";
const SECRET_SIG: &str = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
const SESSION_TOKEN: &str = "FwoGZXIvYXdzELEAKTOKENEXAMPLE";

/// RetryError's text: `Error performing <method> <url> in <elapsed> - <reason>`.
fn retry(method: &str, url: &str, reason: &str) -> String {
    format!("Error performing {method} {url} in 52.318ms - {reason}")
}

fn status(code: &str, body: &str) -> String {
    format!("Server returned non-2xx status code: {code}: {body}")
}

fn denied(text: String) -> OsError {
    OsError::PermissionDenied {
        path: "repo/config".into(),
        source: text.into(),
    }
}

fn generic(text: String) -> OsError {
    OsError::Generic {
        store: "S3",
        source: text.into(),
    }
}

fn not_found(text: String) -> OsError {
    OsError::NotFound {
        path: "repo/config".into(),
        source: text.into(),
    }
}

fn message(e: OsError) -> (String, bool) {
    match map_os_err("config", e) {
        StoreError::Io {
            message, retryable, ..
        } => (message, retryable),
        other => panic!("expected an Io error, got {other:?}"),
    }
}

fn assert_clean(msg: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!msg.contains(s), "{s:?} leaked into {msg:?}");
    }
}

const S3_INVALID_KEY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist in our records.</Message><AWSAccessKeyId>AKIAIOSFODNN7LEAKTEST</AWSAccessKeyId><RequestId>3B3C7C725673C630</RequestId><HostId>eftixk72aD6Ap51TnqcoF8eFidJG9Z/2mkiDFu8yU9AS1ed4OpIszj7UDNEHGran</HostId></Error>"#;

#[test]
fn s3_invalid_access_key_keeps_status_code_and_request_id_only() {
    let url = "https://tidemark-prod.s3.us-east-1.amazonaws.com/repo/config";
    let (msg, retryable) = message(denied(retry(
        "GET",
        url,
        &status("403 Forbidden", S3_INVALID_KEY),
    )));
    assert!(
        msg.starts_with(
            "GET failed: HTTP 403 Forbidden, code InvalidAccessKeyId, request id 3B3C7C725673C630\nhint: "
        ),
        "{msg}"
    );
    assert!(msg.contains("AWS_ACCESS_KEY_ID"), "{msg}");
    assert!(!retryable);
    assert_clean(
        &msg,
        &[KEY_ID, "records", "amazonaws.com", "HostId", "eftixk"],
    );
}

#[test]
fn s3_signature_mismatch_drops_string_to_sign_and_canonical_request() {
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match the signature you provided. Check your key and signing method.</Message><AWSAccessKeyId>{KEY_ID}</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256
20260501T100000Z
20260501/us-east-1/s3/aws4_request
8c1f0a0f3a6f1e0c</StringToSign><SignatureProvided>{SECRET_SIG}</SignatureProvided><StringToSignBytes>41 57 53 34</StringToSignBytes><CanonicalRequest>PUT
/repo/wal/000000010000000000000001
x-id=PutObject
host:tidemark-prod.s3.amazonaws.com
x-amz-date:20260501T100000Z
x-amz-security-token:{SESSION_TOKEN}

host;x-amz-date;x-amz-security-token
UNSIGNED-PAYLOAD</CanonicalRequest><CanonicalRequestBytes>50 55 54</CanonicalRequestBytes><RequestId>4442587FB7D0A2F9</RequestId><HostId>xyz</HostId></Error>"#
    );
    let (msg, _) = message(denied(retry(
        "PUT",
        "https://tidemark-prod.s3.amazonaws.com/repo/wal/000000010000000000000001",
        &status("403 Forbidden", &body),
    )));
    assert!(
        msg.starts_with(
            "PUT failed: HTTP 403 Forbidden, code SignatureDoesNotMatch, request id 4442587FB7D0A2F9\nhint: "
        ),
        "{msg}"
    );
    assert!(msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
    assert_clean(
        &msg,
        &[
            KEY_ID,
            SECRET_SIG,
            SESSION_TOKEN,
            "aws4_request",
            "CanonicalRequest",
        ],
    );
}

#[test]
fn s3_access_denied_on_list_is_not_retryable_and_names_the_bucket_policy() {
    // A list failure reaches us as Generic (aws/client.rs wraps it as ListRequest).
    let text = format!(
        "Generic S3 error: Error performing list request: {}",
        retry(
            "GET",
            "http://127.0.0.1:9000/tidemark?list-type=2&prefix=repo%2Fwal%2F",
            &status(
                "403 Forbidden",
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>17C3B9A5E0E2D5A1</RequestId><HostId>dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8</HostId></Error>"
            )
        )
    );
    let (msg, retryable) = message(generic(text));
    assert!(
        msg.starts_with(
            "list failed: HTTP 403 Forbidden, code AccessDenied, request id 17C3B9A5E0E2D5A1\nhint: "
        ),
        "{msg}"
    );
    assert!(msg.contains("bucket policy"), "{msg}");
    assert!(!retryable, "a 403 never heals by retrying");
    assert_clean(&msg, &["list-type", "prefix=", "127.0.0.1"]);
}

#[test]
fn missing_bucket_is_an_error_with_a_hint_not_a_missing_object() {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>tidemark-prod</BucketName><RequestId>0B4E6C4A0D1F0C9E</RequestId><HostId>abc</HostId></Error>";
    let e = not_found(retry(
        "GET",
        "https://tidemark-prod.s3.amazonaws.com/repo/config",
        &status("404 Not Found", body),
    ));
    let (msg, retryable) = message(e);
    assert!(
        msg.starts_with(
            "GET failed: HTTP 404 Not Found, code NoSuchBucket, request id 0B4E6C4A0D1F0C9E\nhint: the bucket named in --repo does not exist"
        ),
        "{msg}"
    );
    assert!(!retryable);

    // The same on a list (Generic), and Azure's name for it.
    let list = generic(format!(
        "Error performing list request: {}",
        retry(
            "GET",
            "http://h/b?list-type=2",
            &status("404 Not Found", body)
        )
    ));
    assert!(message(list).0.contains("does not exist"));
    let azure = not_found(retry(
        "GET",
        "https://acct.blob.core.windows.net/c/repo/config",
        &status("404 Not Found", "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ContainerNotFound</Code><Message>The specified container does not exist.\nRequestId:1f7c1a34-601e-0044-1d2b-2c3f4c000000\nTime:2026-05-01T10:00:00.1234567Z</Message></Error>"),
    ));
    let (msg, _) = message(azure);
    assert!(msg.contains("code ContainerNotFound"), "{msg}");
    assert!(
        msg.contains("request id 1f7c1a34-601e-0044-1d2b-2c3f4c000000"),
        "{msg}"
    );
}

#[test]
fn missing_object_stays_not_found() {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>repo/config</Key><RequestId>1</RequestId></Error>";
    let e = not_found(retry(
        "GET",
        "http://h/b/repo/config",
        &status("404 Not Found", body),
    ));
    assert!(matches!(
        map_os_err("config", e),
        StoreError::NotFound { key } if key == "config"
    ));
    // HEAD answers carry no body.
    let e = not_found(retry(
        "HEAD",
        "http://h/b/repo/config",
        &status("404 Not Found", ""),
    ));
    assert!(map_os_err("config", e).is_not_found());
}

#[test]
fn head_403_without_body_still_names_status_and_hint() {
    let (msg, retryable) = message(denied(retry(
        "HEAD",
        "http://h/b/repo/config",
        &status("403 Forbidden", ""),
    )));
    assert!(
        msg.starts_with("HEAD failed: HTTP 403 Forbidden\nhint: "),
        "{msg}"
    );
    assert!(!retryable);
}

#[test]
fn azure_authentication_failure_drops_the_signed_string() {
    let body = "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code><Message>Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature.\nRequestId:6f3c0e2a-a01e-0019-0c1a-2c3f4c000000\nTime:2026-05-01T10:00:00.0000000Z</Message><AuthenticationErrorDetail>The MAC signature found in the HTTP request 'q0ZC2hMUOjQ0zLmKc0Nn2pQdb2Q3BSb4Vn1lZs9uQ8E=' is not the same as any computed signature. Server used following string to sign: 'PUT\n\n\nx-ms-date:Fri, 01 May 2026 10:00:00 GMT\n/acct/c/repo/config'.</AuthenticationErrorDetail></Error>";
    let (msg, _) = message(denied(retry(
        "PUT",
        "https://acct.blob.core.windows.net/c/repo/config",
        &status("403 Forbidden", body),
    )));
    assert!(
        msg.starts_with(
            "PUT failed: HTTP 403 Forbidden, code AuthenticationFailed, request id 6f3c0e2a-a01e-0019-0c1a-2c3f4c000000\nhint: Azure"
        ),
        "{msg}"
    );
    assert_clean(
        &msg,
        &["q0ZC2hMUOjQ0", "string to sign", "x-ms-date", "MAC"],
    );
}

#[test]
fn gcs_errors_keep_their_code_only() {
    let xml = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access denied.</Message><Details>backup@tidemark-prod.iam.gserviceaccount.com does not have storage.objects.create access to the Google Cloud Storage object.</Details></Error>";
    let (msg, _) = message(denied(retry(
        "PUT",
        "https://storage.googleapis.com/b/repo/config",
        &status("403 Forbidden", xml),
    )));
    assert!(
        msg.starts_with("PUT failed: HTTP 403 Forbidden, code AccessDenied\nhint: "),
        "{msg}"
    );
    assert_clean(&msg, &["gserviceaccount", "storage.objects"]);

    let json = r#"{"error":{"code":401,"message":"Invalid Credentials","errors":[{"message":"Invalid Credentials","domain":"global","reason":"authError","locationType":"header","location":"Authorization"}]}}"#;
    let e = OsError::Unauthenticated {
        path: "repo/config".into(),
        source: retry(
            "GET",
            "https://storage.googleapis.com/b/o",
            &status("401 Unauthorized", json),
        )
        .into(),
    };
    let (msg, retryable) = message(e);
    assert!(
        msg.starts_with("GET failed: HTTP 401 Unauthorized, code authError\nhint: "),
        "{msg}"
    );
    assert!(!retryable);

    let oauth = r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
    let s = Summary::parse(
        &retry(
            "POST",
            "https://oauth2.googleapis.com/token",
            &status("400 Bad Request", oauth),
        ),
        None,
    );
    assert_eq!(s.code.as_deref(), Some("invalid_grant"));
    assert!(!s.to_string().contains("JWT"));
}

#[test]
fn transport_failures_keep_the_reason_without_url_or_credentials() {
    let text = format!(
        "Generic S3 error: Error performing GET http://admin:hunter2@127.0.0.1:9/b/repo/config?X-Amz-Signature={SECRET_SIG}&X-Amz-Credential={KEY_ID} in 3.1s, after 10 retries, max_retries: 10, retry_timeout: 180s  - HTTP error: error sending request"
    );
    let (msg, retryable) = message(generic(text));
    assert_eq!(msg, "GET failed: HTTP error: error sending request");
    assert!(retryable);

    // A reason that carries a URL of its own (a credential provider's).
    let s = Summary::parse(
        &format!("Generic S3 error: cannot reach https://admin:hunter2@sts.example.com/path?Action=AssumeRole&X-Amz-Signature={SECRET_SIG} for token=abc123def"),
        None,
    );
    let msg = s.to_string();
    assert!(msg.contains("https://sts.example.com/path"), "{msg}");
    assert_clean(
        &msg,
        &["hunter2", "admin", SECRET_SIG, "AssumeRole", "abc123def"],
    );
    assert!(msg.contains("token=<redacted>"), "{msg}");
}

#[test]
fn server_errors_stay_retryable() {
    let e = generic(format!(
        "Error performing PUT http://h/b/k in 180.2s, after 10 retries, max_retries: 10, retry_timeout: 180s  - {}",
        status("503 Service Unavailable", "")
    ));
    let (msg, retryable) = message(e);
    assert_eq!(msg, "PUT failed: HTTP 503 Service Unavailable");
    assert!(retryable);
    for code in ["408 Request Timeout", "429 Too Many Requests"] {
        let s = Summary::parse(&retry("GET", "http://h", &status(code, "")), None);
        assert!(s.retryable(), "{code}");
    }
    // A 200 whose body says InternalError (S3 CompleteMultipartUpload).
    let s = Summary::parse(
        &format!("Error performing complete multipart request: repo/p: {}", retry("POST", "http://h/b/p?uploadId=x", "Server returned error response: <Error><Code>InternalError</Code><Message>We encountered an internal error.</Message><RequestId>R1</RequestId></Error>")),
        None,
    );
    assert_eq!(
        s.to_string(),
        "complete multipart failed: code InternalError, request id R1"
    );
}

#[test]
fn hostile_bodies_keep_nothing_but_tokens() {
    let body = format!(
        "<Error><Code>Denied because key {KEY_ID} is bad</Code><RequestId><![CDATA[x]]></RequestId></Error>"
    );
    let s = Summary::parse(
        &retry("GET", "http://h", &status("403 Forbidden", &body)),
        None,
    );
    assert_eq!(s.code, None);
    assert_eq!(s.request_id, None);
    assert_clean(&s.to_string(), &[KEY_ID]);

    let huge = "A".repeat(1 << 20);
    let s = Summary::parse(&format!("Generic S3 error: {huge}"), None);
    assert!(s.to_string().chars().count() <= MAX_DETAIL + 1);

    for text in [
        "",
        "status code: ",
        "status code: 40",
        "Error performing ",
        "<Code>",
        "://",
        "a://b@",
    ] {
        let _ = Summary::parse(text, None).to_string();
    }
    assert_eq!(Summary::parse("", None).to_string(), "request failed");
    assert_eq!(Summary::parse("", Some(403)).status, Some(403));
}

#[test]
fn variants_imply_a_status_when_the_text_names_none() {
    let e = denied("something new in a later object_store".into());
    let (msg, retryable) = message(e);
    assert!(msg.starts_with("HTTP 403, "), "{msg}");
    assert!(msg.contains("something new"), "{msg}");
    assert!(msg.contains("\nhint: "));
    assert!(!retryable);
}

#[test]
fn create_only_conflicts_stay_already_exists() {
    for e in [
        OsError::Precondition {
            path: "p".into(),
            source: "412".into(),
        },
        OsError::AlreadyExists {
            path: "p".into(),
            source: "409".into(),
        },
    ] {
        assert!(matches!(
            map_os_err("wal/x", e),
            StoreError::AlreadyExists { .. }
        ));
    }
}

#[test]
fn authorization_headers_and_query_credentials_are_masked() {
    let t = mask_credential_pairs(&format!(
        "sent Authorization: AWS4-HMAC-SHA256 Credential={KEY_ID}/20260501/us-east-1/s3/aws4_request, SignedHeaders=host, Signature={SECRET_SIG}\nnext line; sig=abc&se=2026 client_secret=xyz password = p4ss"
    ));
    assert_clean(&t, &[KEY_ID, SECRET_SIG, "abc&", "xyz", "p4ss"]);
    assert!(t.contains("next line"), "{t}");
    assert!(t.contains("se=2026"), "{t}");
    // Prose with a colon after a credential word is left alone.
    assert_eq!(
        mask_credential_pairs("error fetching token: timed out"),
        "error fetching token: timed out"
    );
}

#[test]
fn env_secret_values_are_removed_whatever_the_text() {
    let values = vec![
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYLEAKEXAMPLE".to_string(),
        "test".to_string(),
    ];
    let t = scrub_values(
        "x wJalrXUtnFEMI/K7MDENG/bPxRfiCYLEAKEXAMPLE y test",
        &values,
    );
    assert_eq!(t, "x <redacted> y test");
}

/// A one-answer-per-connection HTTP server on loopback that replies `status` with `body` to
/// every request, for errors made by object_store itself rather than by hand.
async fn canned_server(status: &'static str, body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                // Read the head and any body, so the client sees the answer, not a reset.
                let mut req = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/xml\r\nx-amz-request-id: 3B3C7C725673C630\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

fn s3_at(endpoint: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_bucket_name("tidemark-prod")
        .with_region("us-east-1")
        .with_access_key_id(KEY_ID)
        .with_secret_access_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYLEAKEXAMPLE")
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            retry_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        })
        .build()
        .unwrap()
}

#[tokio::test]
async fn errors_made_by_object_store_itself_are_summarised() {
    use futures::TryStreamExt;
    use object_store::{path::Path, ObjectStore, PutPayload};
    let endpoint = canned_server("403 Forbidden", S3_INVALID_KEY.to_string()).await;
    let s3 = s3_at(&endpoint);
    let p = Path::from("repo/config");
    let expect = "failed: HTTP 403 Forbidden, code InvalidAccessKeyId, request id 3B3C7C725673C630\nhint: the server does not know this access key id";
    let get = s3.get(&p).await.unwrap_err();
    let put = s3.put(&p, PutPayload::from_static(b"x")).await.unwrap_err();
    let list = s3
        .list(Some(&Path::from("repo/wal")))
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    for (op, e) in [("GET", get), ("PUT", put), ("list", list)] {
        let raw = e.to_string();
        assert!(
            raw.contains(KEY_ID),
            "the raw error should carry the key id: {raw}"
        );
        let (msg, retryable) = message(e);
        assert!(msg.starts_with(&format!("{op} {expect}")), "{op}: {msg}");
        assert!(!retryable, "{op}");
        assert_clean(&msg, &[KEY_ID, &endpoint, "records"]);
    }
    let head = s3.head(&p).await.unwrap_err();
    let (msg, _) = message(head);
    assert!(msg.starts_with("HEAD failed: HTTP 403 Forbidden"), "{msg}");

    let endpoint = canned_server(
        "404 Not Found",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>tidemark-prod</BucketName><RequestId>0B4E6C4A0D1F0C9E</RequestId></Error>".into(),
    )
    .await;
    let e = s3_at(&endpoint).get(&p).await.unwrap_err();
    let (msg, _) = message(e);
    assert!(msg.contains("code NoSuchBucket"), "{msg}");
    assert!(
        msg.contains("hint: the bucket named in --repo does not exist"),
        "{msg}"
    );

    // Nothing listens: a transport failure.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let e = s3_at(&format!("http://{closed}"))
        .get(&p)
        .await
        .unwrap_err();
    let (msg, retryable) = message(e);
    assert!(msg.starts_with("GET failed: HTTP error: "), "{msg}");
    assert!(
        msg.contains("Connection refused"),
        "the root cause is kept: {msg}"
    );
    assert!(!msg.contains(&closed.to_string()), "{msg}");
    assert!(retryable);
}
