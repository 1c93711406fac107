//! Bearer tokens mapped to one tenant or to all (`*`), e.g. `tokA=acme,root=*` (docs/SPEC.md §10).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use super::ApiState;

/// What a token may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    All,
    Tenant(String),
}

impl Access {
    pub fn may_read(&self, tenant: &str) -> bool {
        match self {
            Access::All => true,
            Access::Tenant(t) => t == tenant,
        }
    }

    /// 404 for a tenant the token may not read: the same answer as for a missing tenant.
    pub fn check(&self, tenant: &str, what: &str) -> Result<(), ApiError> {
        if self.may_read(tenant) {
            Ok(())
        } else {
            Err(ApiError::not_found(what))
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokensError {
    #[error("API token entry `{0}` is not TOKEN=TENANT (or TOKEN=* for all tenants)")]
    Malformed(String),
    #[error("API token entry `{0}` repeats a token")]
    Duplicate(String),
}

#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, Access>);

impl Tokens {
    /// Parses `TOKEN=TENANT,TOKEN=*`; whitespace around entries is ignored.
    pub fn parse(spec: &str) -> Result<Self, TokensError> {
        let mut map = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (tok, tenant) = entry
                .split_once('=')
                .map(|(a, b)| (a.trim(), b.trim()))
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .ok_or_else(|| TokensError::Malformed(entry.to_string()))?;
            let access = if tenant == "*" {
                Access::All
            } else {
                Access::Tenant(tenant.to_string())
            };
            if map.insert(tok.to_string(), access).is_some() {
                return Err(TokensError::Duplicate(entry.to_string()));
            }
        }
        Ok(Tokens(map))
    }

    pub fn get(&self, token: &str) -> Option<&Access> {
        self.0.get(token)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The token of `Bearer TOKEN`. The scheme is case-insensitive (RFC 7235 section 2.1:
/// `bearer x` is the same credential) and may be followed by any run of spaces or tabs.
fn bearer_token(h: &str) -> Option<&str> {
    let (scheme, rest) = h.trim_start().split_once([' ', '\t'])?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<Arc<ApiState>> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing `Authorization: Bearer TOKEN` header")
            })?;
        let token = header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            ApiError::unauthorized("the Authorization header is not `Bearer TOKEN`")
        })?;
        state
            .tokens
            .get(token)
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("unknown token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tenant_and_wildcard_tokens() {
        let t = Tokens::parse(" tokA=acme, root=* ,").unwrap();
        assert_eq!(t.get("tokA"), Some(&Access::Tenant("acme".into())));
        assert_eq!(t.get("root"), Some(&Access::All));
        assert_eq!(t.get("nope"), None);
        assert!(Access::All.may_read("x"));
        assert!(!Access::Tenant("a".into()).may_read("b"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for h in [
            "Bearer x",
            "bearer x",
            "BEARER x",
            "bEaReR  x ",
            "Bearer\tx",
        ] {
            assert_eq!(bearer_token(h), Some("x"), "{h:?}");
        }
        for h in ["Bearer", "Bearer ", "Basic x", "Bearerx", "x"] {
            assert_eq!(bearer_token(h), None, "{h:?}");
        }
    }

    #[test]
    fn rejects_malformed_and_duplicate_entries() {
        assert_eq!(
            Tokens::parse("tok").unwrap_err(),
            TokensError::Malformed("tok".into())
        );
        assert_eq!(
            Tokens::parse("=acme").unwrap_err(),
            TokensError::Malformed("=acme".into())
        );
        assert!(matches!(
            Tokens::parse("a=x,a=y"),
            Err(TokensError::Duplicate(_))
        ));
    }
}
