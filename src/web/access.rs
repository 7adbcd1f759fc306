//! Who may use the dashboard, and for what: an [`AccessPolicy`] the app
//! implements (or a closure), and the two the library ships, the ones
//! `demiarch-sessions serve` uses.
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::header;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::{Error, Result};

/// The cookie `/login` sets for [`TokenAccess`].
pub const TOKEN_COOKIE: &str = "demiarch_token";
/// The shortest token [`TokenAccess`] takes.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a request may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read everything and run every action.
    Full,
    /// Read everything; actions are hidden and refused (403).
    ReadOnly,
    /// Credentials are missing or wrong: the API answers 401, a page sends
    /// the browser to the login page.
    Unauthorized,
    /// Refused whatever it carries (403).
    Forbidden,
}

impl Access {
    /// Whether actions are allowed.
    pub fn can_act(self) -> bool {
        self == Access::Full
    }
}

/// Decides, per request, what it may do. Implemented by the app, or by a
/// closure `Fn(&Parts) -> Access`.
pub trait AccessPolicy: Send + Sync + 'static {
    /// What this request may do. `request.extensions` holds
    /// `ConnectInfo<SocketAddr>` when the server records it.
    fn access(&self, request: &Parts) -> Access;

    /// Whether `token`, typed into the login page, is valid; a valid one is
    /// kept in an HttpOnly, SameSite=Strict cookie that
    /// [`AccessPolicy::access`] then finds. Policies without tokens keep the
    /// default, which shows no login form.
    fn login(&self, token: &str) -> bool {
        let _ = token;
        false
    }

    /// Whether this policy has a login page.
    fn has_login(&self) -> bool {
        false
    }
}

impl<F> AccessPolicy for F
where
    F: Fn(&Parts) -> Access + Send + Sync + 'static,
{
    fn access(&self, request: &Parts) -> Access {
        self(request)
    }
}

/// Requests from this machine only: the peer address and the `Host` header
/// must both be loopback, which also closes DNS rebinding (a page of another
/// site re-pointed at 127.0.0.1 sends its own name as `Host`). The peer is
/// read from `ConnectInfo<SocketAddr>`: serve the app with
/// `into_make_service_with_connect_info::<SocketAddr>()` (as
/// [`serve`](crate::web::serve) does); without it every request is refused.
/// Behind a reverse proxy on the same machine every request comes from
/// loopback: use [`TokenAccess`] or the app's own policy there.
#[derive(Clone, Copy, Debug)]
pub struct LoopbackAccess {
    grant: Access,
}

impl LoopbackAccess {
    /// Everything, from loopback.
    pub fn full() -> Self {
        Self {
            grant: Access::Full,
        }
    }

    /// Reading only, from loopback.
    pub fn read_only() -> Self {
        Self {
            grant: Access::ReadOnly,
        }
    }
}

impl Default for LoopbackAccess {
    fn default() -> Self {
        Self::full()
    }
}

/// The host a request is addressed to: its `Host` header, or the URI's
/// authority (HTTP/2 carries no `Host`).
pub(crate) fn host_of(request: &Parts) -> Option<String> {
    match request
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
    {
        Some(host) => Some(host.to_owned()),
        None => request.uri.authority().map(|a| a.as_str().to_owned()),
    }
}

/// Whether a `Host` header names this machine: `127.0.0.1`, `localhost` or
/// `[::1]`, with or without a port.
pub fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().map(|n| format!("[{n}]")),
        None => host.split(':').next().map(str::to_owned),
    };
    matches!(
        name.as_deref(),
        Some("127.0.0.1") | Some("localhost") | Some("[::1]")
    )
}

impl AccessPolicy for LoopbackAccess {
    fn access(&self, request: &Parts) -> Access {
        let peer_local = request
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|ConnectInfo(peer)| peer.ip().is_loopback());
        let host_local = host_of(request).is_some_and(|host| loopback_host(&host));
        match peer_local && host_local {
            true => self.grant,
            false => Access::Forbidden,
        }
    }
}

/// A shared secret: `Authorization: Bearer TOKEN`, or the cookie the login
/// page sets. Compared in constant time.
#[derive(Clone)]
pub struct TokenAccess {
    token: String,
    grant: Access,
}

impl std::fmt::Debug for TokenAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAccess")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl TokenAccess {
    /// Full access for requests carrying `token`: at least 16 printable
    /// ASCII characters, without `;`, `,`, `"` or `\` (it travels in a
    /// cookie).
    pub fn new(token: impl Into<String>) -> Result<Self> {
        let token = token.into();
        let usable = token.len() >= MIN_TOKEN_LEN
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'));
        if !usable {
            return Err(Error::InvalidInput {
                field: "token",
                reason: format!(
                    "use at least {MIN_TOKEN_LEN} printable ASCII characters, without ; , \" or \\"
                ),
            });
        }
        Ok(Self {
            token,
            grant: Access::Full,
        })
    }

    /// Reading only, even with the token.
    pub fn read_only(mut self) -> Self {
        self.grant = Access::ReadOnly;
        self
    }

    fn matches(&self, given: &str) -> bool {
        given.as_bytes().ct_eq(self.token.as_bytes()).into()
    }
}

/// The token a request carries: its bearer header, or the login cookie.
fn carried(request: &Parts) -> Option<String> {
    let bearer = request
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        return Some(token.trim().to_owned());
    }
    request
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(TOKEN_COOKIE)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        })
}

impl AccessPolicy for TokenAccess {
    fn access(&self, request: &Parts) -> Access {
        match carried(request).is_some_and(|given| self.matches(&given)) {
            true => self.grant,
            false => Access::Unauthorized,
        }
    }

    fn login(&self, token: &str) -> bool {
        self.matches(token)
    }

    fn has_login(&self) -> bool {
        true
    }
}
