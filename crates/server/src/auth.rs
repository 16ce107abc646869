//! Who a connection is: JWT verification (HS256 secret, RS256/ES256 PEM public key), the
//! anonymous development mode, the `rooms` claim, and HS256 token minting for `parley token`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

/// Longest user id (`sub`), in characters.
pub const MAX_USER_ID: usize = 64;

/// An authenticated identity, shared by a connection and every event it posts.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user id (`sub`, or the anonymous name).
    pub user: Arc<str>,
    /// The display name (`name`, else the user id).
    pub name: Arc<str>,
    /// Rooms the token may join; `None` means any.
    pub rooms: Option<Arc<[String]>>,
    /// When the token expires (Unix seconds); `None` in anonymous mode.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Whether this identity may join `room` under its `rooms` claim.
    pub fn may_join(&self, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, room)),
        }
    }
}

/// The claims parley reads. Unknown claims are ignored.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, 1 to 64 characters.
    pub sub: String,
    /// Expiry, Unix seconds. Required.
    pub exp: u64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds; a token issued in the future is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Room names or `*`-patterns the token may join; absent means any room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// Why a token was refused. The message is safe to show to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token where one is required.
    #[error("a token is required")]
    Missing,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// Wrong signature, key or algorithm.
    #[error("invalid token signature or algorithm")]
    BadSignature,
    /// `iss` or `aud` does not match the configuration.
    #[error("token issuer or audience not accepted")]
    WrongIssuerOrAudience,
    /// Not a JWT, or a required claim is missing or malformed.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `exp` lies further ahead than `auth.max_token_ttl_s` (often milliseconds given for
    /// seconds).
    #[error(
        "token expiry too far ahead: exp must be in seconds (not milliseconds) and at most {0} \
         seconds from now"
    )]
    ExpTooFar(u64),
}

/// Verifies tokens, or admits anonymous users when no key is configured.
pub enum Authenticator {
    /// Development mode: identities are taken on trust.
    Anonymous,
    /// Tokens are required and verified.
    Jwt(Box<JwtVerifier>),
}

/// A key, its algorithm and the validation rules.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    leeway_s: u64,
    max_ttl_s: u64,
}

impl Authenticator {
    /// Builds the authenticator from `[auth]`; fails on an unreadable or unusable key file.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Authenticator> {
        let (key, alg) = if let Some(secret) = &config.jwt_secret {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &config.jwt_public_key {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (key, Algorithm::ES256)
            } else {
                anyhow::bail!(
                    "{} is neither an RSA nor an EC (P-256) public key in PEM format",
                    path.display()
                );
            }
        } else {
            return Ok(Authenticator::Anonymous);
        };
        let mut validation = Validation::new(alg);
        validation.leeway = config.leeway_s;
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss`/`aud` only when the token carries them; a configured one
        // must also be present.
        let mut required = vec!["exp", "sub"];
        if config.issuer.is_some() {
            required.push("iss");
        }
        if config.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_aud = config.audience.is_some();
        if let Some(aud) = &config.audience {
            validation.set_audience(&[aud]);
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Authenticator::Jwt(Box::new(JwtVerifier {
            key,
            validation,
            leeway_s: config.leeway_s,
            max_ttl_s: config.max_token_ttl_s,
        })))
    }

    /// Whether tokens are required.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Authenticator::Anonymous)
    }

    /// Verifies a token into an identity. In anonymous mode every token is refused: identities
    /// come from the URL there.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let Authenticator::Jwt(verifier) = self else {
            return Err(AuthError::Malformed(
                "this server runs in anonymous mode; pass ?user=NAME instead".into(),
            ));
        };
        verifier.verify(token)
    }
}

impl JwtVerifier {
    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_) => AuthError::BadSignature,
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                    AuthError::WrongIssuerOrAudience
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Malformed(format!("missing claim `{claim}`"))
                }
                ErrorKind::Json(err) => AuthError::Malformed(describe_claims_error(err)),
                ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                    AuthError::Malformed("a part of the token is not base64url-encoded JSON".into())
                }
                _ => AuthError::Malformed(
                    "not a JWT (three base64url parts separated by dots)".into(),
                ),
            },
        )?;
        let claims = data.claims;
        if claims.exp > now_unix().saturating_add(self.max_ttl_s + self.leeway_s) {
            return Err(AuthError::ExpTooFar(self.max_ttl_s));
        }
        if let Some(iat) = claims.iat {
            if iat > now_unix() + self.leeway_s {
                return Err(AuthError::NotYetValid);
            }
        }
        identity_from_claims(claims)
    }
}

/// A claims JSON error as a sentence naming the claim, without serde's positions.
fn describe_claims_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let claim = text
        .split('`')
        .nth(1)
        .filter(|_| text.starts_with("missing field"));
    match claim {
        Some(claim) => format!("missing claim `{claim}`"),
        None if err.is_data() => "a claim has the wrong type: sub and name are strings; exp, \
                                   nbf and iat are whole seconds since 1970; rooms is a list of \
                                   strings"
            .to_owned(),
        None => "the claims are not a JSON object".to_owned(),
    }
}

fn identity_from_claims(claims: Claims) -> Result<Identity, AuthError> {
    let len = claims.sub.chars().count();
    if len == 0 || len > MAX_USER_ID {
        return Err(AuthError::Malformed(format!(
            "`sub` must be 1 to {MAX_USER_ID} characters"
        )));
    }
    let name = match claims.name {
        Some(name) if !name.is_empty() => name,
        _ => claims.sub.clone(),
    };
    Ok(Identity {
        user: claims.sub.into(),
        name: name.into(),
        rooms: claims.rooms.map(Into::into),
        expires_at: Some(claims.exp),
    })
}

/// An anonymous identity from `?user=` (and `?name=`), or a fresh `guest-…` name when none was
/// given. Fails on an empty or over-long name.
pub fn anonymous_identity(user: Option<&str>, name: Option<&str>) -> Result<Identity, AuthError> {
    let user = match user {
        Some(user) => user.to_owned(),
        None => format!("guest-{:06x}", rand::random::<u32>() & 0xff_ffff),
    };
    let len = user.chars().count();
    if len == 0 || len > MAX_USER_ID || user.chars().any(char::is_control) {
        return Err(AuthError::Malformed(format!(
            "user must be 1 to {MAX_USER_ID} printable characters"
        )));
    }
    let name = name.filter(|n| !n.is_empty()).unwrap_or(&user).to_owned();
    Ok(Identity {
        user: user.into(),
        name: name.into(),
        rooms: None,
        expires_at: None,
    })
}

/// Signs an HS256 token for `parley token`, `POST /api/tokens` and the tests. Generic over the
/// claims so the API can add `iss`/`aud` when the node requires them.
pub fn mint_hs256(secret: &str, claims: &impl Serialize) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// The claims of a token minted by the node: parley's, plus `iss`/`aud` when the node requires
/// them, so the node accepts what it mints.
#[derive(Serialize)]
struct MintedClaims<'a> {
    #[serde(flatten)]
    claims: Claims,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Mints the HS256 token this node would accept for `sub`, valid `ttl_s` seconds from now
/// (for `parley token` and `POST /api/tokens`). Returns the token and its `exp`.
pub fn mint_for_node(
    config: &AuthConfig,
    secret: &str,
    sub: String,
    name: Option<String>,
    ttl_s: u64,
    rooms: Option<Vec<String>>,
) -> (String, u64) {
    let now = now_unix();
    let exp = now.saturating_add(ttl_s);
    let claims = MintedClaims {
        claims: Claims {
            sub,
            exp,
            nbf: None,
            iat: Some(now),
            name,
            rooms,
        },
        iss: config.issuer.as_deref(),
        aud: config.audience.as_deref(),
    };
    (mint_hs256(secret, &claims), exp)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Matches `name` against a `rooms` claim entry, where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(head) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let tail = parts.pop().unwrap_or("");
    for part in parts {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= tail.len() && remaining.ends_with(tail)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("general", "general"));
        assert!(!glob_match("general", "general2"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("team-*", "team-a"));
        assert!(!glob_match("team-*", "teams"));
        assert!(glob_match("*-ops", "eu-ops"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
