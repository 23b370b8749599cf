//! The signing keys: a JWKS given once, or fetched from a URL and refreshed.

use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::OAuthError;

/// The largest key set document read (bytes).
const MAX_JWKS: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest time between two fetches asked for by unknown `kid`s, so a flood of
/// made-up key ids cannot make the server hammer its issuer.
const MIN_GAP: Duration = Duration::from_secs(30);

/// Where the keys come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Static(String),
    Url(String),
}

/// The key set held now, and how it is renewed.
pub(super) struct Keys {
    set: RwLock<Arc<JwkSet>>,
    url: Option<String>,
    client: Option<reqwest::Client>,
    /// When the last fetch was asked for (at start: never).
    last: std::sync::Mutex<Option<Instant>>,
    wake: Arc<Notify>,
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.wake.notify_one(); // the refresher sees the keys gone and ends
    }
}

/// Reads a JWKS document, keeping the public keys that can verify signatures
/// (RSA, EC, OKP); a shared secret (`oct`) is never a key here.
fn parse(text: &str) -> Result<JwkSet, OAuthError> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| OAuthError::BadKeySet(e.to_string()))?;
    let usable: Vec<Jwk> = set
        .keys
        .into_iter()
        .filter(|k| {
            matches!(
                k.algorithm,
                AlgorithmParameters::RSA(_)
                    | AlgorithmParameters::EllipticCurve(_)
                    | AlgorithmParameters::OctetKeyPair(_)
            ) && jsonwebtoken::DecodingKey::from_jwk(k).is_ok()
        })
        .collect();
    if usable.is_empty() {
        return Err(OAuthError::BadKeySet("no usable signing key".into()));
    }
    Ok(JwkSet { keys: usable })
}

impl Keys {
    pub(super) fn new(source: Source, refresh_every: Duration) -> Result<Arc<Keys>, OAuthError> {
        let (set, url) = match source {
            Source::Static(text) => (parse(&text)?, None),
            Source::Url(url) => (JwkSet { keys: Vec::new() }, Some(url)),
        };
        let client = match &url {
            None => None,
            Some(_) => Some(
                reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|e| OAuthError::Fetch(e.to_string()))?,
            ),
        };
        let keys = Arc::new(Keys {
            set: RwLock::new(Arc::new(set)),
            url,
            client,
            last: std::sync::Mutex::new(None),
            wake: Arc::new(Notify::new()),
        });
        if keys.url.is_some()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (weak, wake) = (Arc::downgrade(&keys), Arc::clone(&keys.wake));
            runtime.spawn(refresher(weak, wake, refresh_every));
        }
        Ok(keys)
    }

    /// The key `kid` names; without a `kid`, the only key. A miss asks the
    /// refresher for a new set.
    pub(super) fn find(&self, kid: Option<&str>) -> Option<Jwk> {
        let set = Arc::clone(&self.set.read().unwrap_or_else(PoisonError::into_inner));
        let found = match kid {
            Some(kid) => set.find(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        if found.is_none() && self.url.is_some() {
            self.wake.notify_one();
        }
        found
    }

    /// Fetches the set from its URL; the number of usable keys.
    pub(super) async fn refresh(&self) -> Result<usize, OAuthError> {
        let (Some(url), Some(client)) = (&self.url, &self.client) else {
            return Ok(self
                .set
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .keys
                .len());
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let fetch = async {
            let mut response = client
                .get(url)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| OAuthError::Fetch(e.without_url().to_string()))?;
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| OAuthError::Fetch(e.without_url().to_string()))?
            {
                if body.len() + chunk.len() > MAX_JWKS {
                    return Err(OAuthError::BadKeySet("larger than 1 MiB".into()));
                }
                body.extend_from_slice(&chunk);
            }
            parse(&String::from_utf8_lossy(&body))
        };
        let set = tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| OAuthError::Fetch("timed out".into()))??;
        let n = set.keys.len();
        let old = std::mem::replace(
            &mut *self.set.write().unwrap_or_else(PoisonError::into_inner),
            Arc::new(set),
        );
        drop(old);
        Ok(n)
    }

    /// Whether a fetch asked for now would come too soon after the last one.
    fn too_soon(&self) -> bool {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < MIN_GAP)
    }
}

/// Fetches the set at once, then every `every` and whenever a token names an
/// unknown key (at most once per [`MIN_GAP`]); ends when the keys are dropped.
async fn refresher(keys: Weak<Keys>, wake: Arc<Notify>, every: Duration) {
    let mut scheduled = true;
    loop {
        {
            let Some(k) = keys.upgrade() else { return };
            if (scheduled || !k.too_soon())
                && let Err(e) = k.refresh().await
            {
                tracing::warn!(error = %e, "the OAuth key set could not be refreshed");
            }
        }
        scheduled = tokio::select! {
            () = tokio::time::sleep(every) => true,
            () = wake.notified() => false,
        };
    }
}
