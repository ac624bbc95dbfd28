//! `image_url` values to image bytes: `data:` URLs (png, jpeg, webp, gif, base64) always;
//! `http(s)://` only when the operator allowed remote images, fetched with size and time limits.
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;

use crate::api::ApiError;

const DATA_TYPES: [&str; 5] = [
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    "image/gif",
];

/// How remote images are fetched (absent: remote URLs are refused).
#[derive(Clone)]
pub struct RemoteImages {
    pub client: reqwest::Client,
    pub max_bytes: usize,
}

impl RemoteImages {
    /// A client for remote images: no cookies, at most 3 redirects, whole-fetch timeout.
    pub fn new(max_bytes: usize, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("cathedral/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, max_bytes })
    }
}

/// Returns the encoded image bytes an `image_url` points at. `param` names the request field
/// in errors (like `messages[0].content[1].image_url.url`).
pub async fn fetch_image_bytes(
    url: &str,
    max_bytes: usize,
    remote: Option<&RemoteImages>,
    param: &str,
) -> Result<Vec<u8>, ApiError> {
    let bad = |msg: String| ApiError::invalid("invalid_image_url", msg).with_param(param);
    if let Some(rest) = strip_prefix_ci(url, "data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err(bad(
                "a data URL needs a comma before the payload: data:image/png;base64,<base64>"
                    .into(),
            ));
        };
        let mut meta_parts = meta.split(';');
        let mime = meta_parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let is_base64 = meta_parts.any(|p| p.trim().eq_ignore_ascii_case("base64"));
        if !DATA_TYPES.contains(&mime.as_str()) {
            let shown = if mime.is_empty() { "(none)" } else { &mime };
            return Err(ApiError::invalid("unsupported_image_type", format!(
                "image media type {shown} is not supported; send image/png, image/jpeg, image/webp or image/gif"
            ))
            .with_param(param));
        }
        if !is_base64 {
            return Err(bad(
                "only base64 data URLs are accepted: data:image/png;base64,<base64>".into(),
            ));
        }
        // Worst case 3 bytes per 4 characters: refuse early what cannot fit.
        if payload.len() / 4 * 3 > max_bytes + 3 {
            return Err(too_large(max_bytes, param));
        }
        let cleaned: Vec<u8> = payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&cleaned)
            .map_err(|e| bad(format!("the data URL's base64 payload is invalid ({e})")))?;
        if bytes.is_empty() {
            return Err(bad("the data URL holds no image bytes".into()));
        }
        if bytes.len() > max_bytes {
            return Err(too_large(max_bytes, param));
        }
        return Ok(bytes);
    }
    let is_remote =
        strip_prefix_ci(url, "http://").is_some() || strip_prefix_ci(url, "https://").is_some();
    if !is_remote {
        return Err(bad(
            "image_url must be a data URL (data:image/png;base64,...) or an http(s) URL".into(),
        ));
    }
    let Some(remote) = remote else {
        return Err(ApiError::invalid(
            "remote_images_disabled",
            "this server does not fetch remote images; send the image inline as a data URL (data:image/png;base64,...)",
        )
        .with_param(param));
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(format!("invalid URL: {e}")))?;
    let limit = remote.max_bytes.min(max_bytes);
    let fetch_err = |msg: String| ApiError::invalid("image_fetch_failed", msg).with_param(param);
    let resp = remote
        .client
        .get(parsed)
        .send()
        .await
        .map_err(|e| fetch_err(format!("fetching the image failed: {e}")))?;
    if !resp.status().is_success() {
        return Err(fetch_err(format!(
            "fetching the image failed: the image server answered {}",
            resp.status()
        )));
    }
    if resp.content_length().is_some_and(|n| n as usize > limit) {
        return Err(too_large(limit, param));
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| fetch_err(format!("fetching the image failed: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(limit, param));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(max: usize, param: &str) -> ApiError {
    ApiError::invalid(
        "image_too_large",
        format!("the image is larger than {max} bytes; send a smaller image"),
    )
    .with_param(param)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(url: &str) -> Result<Vec<u8>, ApiError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fetch_image_bytes(url, 1000, None, "p"))
    }

    #[test]
    fn data_urls() {
        assert_eq!(run("data:image/png;base64,AAEC").unwrap(), vec![0, 1, 2]);
        assert_eq!(
            run("DATA:Image/PNG;base64, AA EC\n").unwrap(),
            vec![0, 1, 2]
        );
        assert_eq!(
            run("data:image/tiff;base64,AAEC").unwrap_err().code,
            "unsupported_image_type"
        );
        assert_eq!(
            run("data:image/png,AAEC").unwrap_err().code,
            "invalid_image_url"
        );
        assert_eq!(
            run("data:image/png;base64,@@@").unwrap_err().code,
            "invalid_image_url"
        );
        assert_eq!(
            run("data:image/png;base64").unwrap_err().code,
            "invalid_image_url"
        );
        assert_eq!(run("ftp://x/y.png").unwrap_err().code, "invalid_image_url");
        assert_eq!(
            run("https://x/y.png").unwrap_err().code,
            "remote_images_disabled"
        );
        let big = format!("data:image/png;base64,{}", "A".repeat(2000));
        assert_eq!(run(&big).unwrap_err().code, "image_too_large");
    }
}
