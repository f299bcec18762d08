//! Who may use the console: the token (a Bearer header, or typed once into the login form,
//! which then sets a session cookie), a CSRF token per session for its forms, and a brake
//! on guessing (each wrong token from an address waits longer, then the address is refused
//! for a while).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "gc_session";
/// How long a login lasts.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// Wrong tokens an address may try in a row before it is refused for [`LOCKOUT`].
const MAX_FAILURES: u32 = 5;
const LOCKOUT: Duration = Duration::from_secs(300);
/// The wait after the first wrong token; it doubles with each one after.
const FIRST_DELAY: Duration = Duration::from_millis(250);

/// How a request proved itself.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A Bearer header: a script, which a browser cannot be tricked into sending.
    Bearer,
    /// The login cookie of a browser: its forms must carry the session's CSRF token.
    Session { id: String, csrf: String },
}

/// Why a request is not let in.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// No credentials, or an unknown or expired session.
    Missing,
    /// A wrong token (after the brake's wait).
    Wrong,
    /// Too many wrong tokens from this address: try again later.
    Locked { retry_after: Duration },
}

struct Session {
    csrf: String,
    started: Instant,
    /// What the last change did, shown once on the next page.
    message: Option<String>,
}

struct Failures {
    count: u32,
    last: Instant,
}

pub struct Auth {
    token_digest: [u8; 32],
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

impl Auth {
    pub fn new(token: &str) -> Self {
        Auth {
            token_digest: digest(token),
            sessions: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Checks the Bearer header or the session cookie.
    pub async fn caller(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Caller, Refusal> {
        if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            return self.check_token(token, peer).await.map(|()| Caller::Bearer);
        }
        let id = session_cookie(headers).ok_or(Refusal::Missing)?;
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, s| s.started.elapsed() < SESSION_LIFE);
        let session = sessions.get(&id).ok_or(Refusal::Missing)?;
        Ok(Caller::Session {
            csrf: session.csrf.clone(),
            id,
        })
    }

    /// Compares a token with the console's; a wrong one waits (longer each time) before
    /// it is refused, and an address that keeps guessing is locked out for a while.
    pub async fn check_token(&self, token: &str, peer: IpAddr) -> Result<(), Refusal> {
        let delay = {
            let mut failures = self.failures.lock().unwrap();
            failures.retain(|_, f| f.last.elapsed() < LOCKOUT);
            if let Some(f) = failures.get(&peer).filter(|f| f.count >= MAX_FAILURES) {
                return Err(Refusal::Locked {
                    retry_after: LOCKOUT.saturating_sub(f.last.elapsed()),
                });
            }
            // Digests of equal length compared: the comparison tells nothing of the token.
            if digest(token) == self.token_digest {
                failures.remove(&peer);
                return Ok(());
            }
            let f = failures.entry(peer).or_insert(Failures {
                count: 0,
                last: Instant::now(),
            });
            f.count += 1;
            f.last = Instant::now();
            FIRST_DELAY * 2u32.pow(f.count - 1)
        };
        tokio::time::sleep(delay).await;
        Err(Refusal::Wrong)
    }

    /// A new session after a right token: its id (for the cookie).
    pub fn start_session(&self) -> String {
        let id = random_hex();
        self.sessions.lock().unwrap().insert(
            id.clone(),
            Session {
                csrf: random_hex(),
                started: Instant::now(),
                message: None,
            },
        );
        id
    }

    pub fn end_session(&self, id: &str) {
        self.sessions.lock().unwrap().remove(id);
    }

    /// Keeps a message for the session's next page.
    pub fn tell(&self, id: &str, message: String) {
        if let Some(session) = self.sessions.lock().unwrap().get_mut(id) {
            session.message = Some(message);
        }
    }

    /// The message kept for this page, once.
    pub fn take_message(&self, id: &str) -> Option<String> {
        self.sessions
            .lock()
            .unwrap()
            .get_mut(id)
            .and_then(|s| s.message.take())
    }
}

/// Whether a form sent by `caller` may change anything: a browser's must carry its
/// session's CSRF token (a page of another site cannot read it); a script's need not.
pub fn form_allowed(caller: &Caller, form_csrf: Option<&str>) -> bool {
    match caller {
        Caller::Bearer => true,
        Caller::Session { csrf, .. } => form_csrf.is_some_and(|sent| digest(sent) == digest(csrf)),
    }
}

/// The `Set-Cookie` value for a session: not readable by scripts, never sent by another
/// site's page, and only over TLS when the console is reached from other machines.
pub fn cookie(id: &str, secure: bool) -> String {
    cookie::Cookie::build((COOKIE, id.to_owned()))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .secure(secure)
        .build()
        .to_string()
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn expired_cookie() -> String {
    let mut cookie = cookie::Cookie::build((COOKIE, ""))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .build();
    cookie.make_removal();
    cookie.to_string()
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_owned())
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wrong_tokens_wait_longer_each_time_then_lock_the_address_out() {
        let auth = Auth::new("right");
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let mut waits = Vec::new();
        for _ in 0..MAX_FAILURES {
            let started = tokio::time::Instant::now();
            assert_eq!(auth.check_token("wrong", peer).await, Err(Refusal::Wrong));
            waits.push(started.elapsed());
        }
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        // Locked: even the right token is refused, at once.
        assert!(matches!(
            auth.check_token("right", peer).await,
            Err(Refusal::Locked { .. })
        ));
        // Another address is not.
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(auth.check_token("right", other).await, Ok(()));
    }

    #[test]
    fn a_browser_form_needs_its_session_csrf_token() {
        let session = Caller::Session {
            id: "s".into(),
            csrf: "c".into(),
        };
        assert!(form_allowed(&session, Some("c")));
        assert!(!form_allowed(&session, Some("x")));
        assert!(!form_allowed(&session, None));
        assert!(form_allowed(&Caller::Bearer, None));
    }

    #[test]
    fn the_session_cookie_is_http_only_and_same_site_strict() {
        let text = cookie("abc", false);
        assert!(text.contains("HttpOnly"), "{text}");
        assert!(text.contains("SameSite=Strict"), "{text}");
        assert!(!text.contains("Secure"), "{text}");
        assert!(cookie("abc", true).contains("Secure"));
    }
}
