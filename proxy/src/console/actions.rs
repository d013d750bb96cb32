//! The console's two actions: end a person's sessions, and re-read the configuration. Each is
//! a page that asks for confirmation (GET) and a form posted from it (POST), which is taken
//! only when it comes from the console's own origin and carries the token of the viewer's
//! session (CSRF). Every action, and every refused post, is audited.

use std::future::Future;

use http::StatusCode;
use portcullis_scim::schema::ResourceType;
use portcullis_scim::store::{format_id, UserEntry};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{directory, link, Console, Shown};
use super::{document, escape};
use crate::auth::sessions::Sessions;
use crate::caller::SessionKey;
use crate::reply::Reply;
use crate::state::Runtime;

/// An action the console can take.
pub enum Act {
    EndSessions(Box<UserEntry>),
    Reload,
}

/// The CSRF token of the session whose id (the cookie's value) is `session_id`: only its
/// holder's pages carry it, and nothing stored lets anyone work it out (the store keeps only
/// the session id's SHA-256, and this is another hash of the id itself).
pub fn csrf_token(session_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"portcullis console form\0")
        .chain_update(session_id.as_bytes())
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Console {
    /// The action at `page` (`users/<id>/end_sessions` or `reload`), if there is one.
    pub fn action(&self, page: &str) -> Option<Act> {
        if page == "reload" {
            return Some(Act::Reload);
        }
        let id = page.strip_prefix("users/")?.strip_suffix("/end_sessions")?;
        self.directory.read(|index| match index.row_of(id)? {
            (ResourceType::User, row) => index
                .user(row)
                .cloned()
                .map(|u| Act::EndSessions(Box::new(u))),
            _ => None,
        })
    }

    /// The path of an action's page, under the console.
    fn action_path(act: &Act) -> String {
        match act {
            Act::EndSessions(user) => format!("users/{}/end_sessions", format_id(user.id)),
            Act::Reload => "reload".to_owned(),
        }
    }

    /// The sessions `user` has, found off the worker thread (it walks every session). An
    /// error if they could not be found: never "none", which would end none and say so.
    async fn sessions_of(&self, user: &UserEntry) -> Result<Vec<SessionKey>, String> {
        let (sessions, runtime, user) = (self.sessions.clone(), self.runtime.clone(), user.clone());
        tokio::task::spawn_blocking(move || sessions_of(&sessions, &runtime, &user))
            .await
            .map_err(|e| format!("the sessions could not be found: {e}"))
    }

    /// The confirmation page of `act`.
    pub(super) fn confirm(&self, act: &Act) -> Shown {
        let (title, question, button) = match act {
            Act::EndSessions(user) => {
                let identity = &self.runtime.config.identity;
                let found = directory::sessions_of(&self.sessions, identity, user);
                let all = found.len();
                let n = directory::holding(found, &self.sessions, &self.runtime, self.now).len();
                // Ended too, and counted in the outcome.
                let lapsed = match all - n {
                    0 => String::new(),
                    1 => " (and 1 that no longer lets them in, ended with them)".to_owned(),
                    lapsed => {
                        format!(" (and {lapsed} that no longer let them in, ended with them)")
                    }
                };
                (
                    format!("End {}'s sessions", user.user_name),
                    format!(
                        "<p>{} has {n} session{} at Portcullis{lapsed}. Ending them signs {} \
                         out everywhere at once; their next request with a session is refused \
                         until they sign in again. The directory is not changed, so an access \
                         token a client or an agent holds for them is taken until it expires: \
                         deactivating them in the directory refuses those too.</p>",
                        escape(&user.user_name),
                        if n == 1 { "" } else { "s" },
                        escape(&user.user_name)
                    ),
                    "End sessions",
                )
            }
            Act::Reload => (
                "Re-read the configuration".to_owned(),
                format!(
                    "<p>Portcullis reads <code>{}</code> again, as on <code>SIGHUP</code>. A file \
                     with problems changes nothing; the problems are shown.</p>",
                    escape(&self.config_path.display().to_string())
                ),
                "Re-read",
            ),
        };
        let content = format!(
            "{question}<form method=\"post\" action=\"{}\"><input type=\"hidden\" name=\"csrf\" \
             value=\"{}\"><button class=\"danger\" type=\"submit\">{button}</button></form>",
            link(&Self::action_path(act)),
            escape(&self.csrf)
        );
        Shown { title, content }
    }

    /// Takes `act`, posted with `form` (`application/x-www-form-urlencoded`) from an origin
    /// that is (`same_origin`) or is not the console's; `reload` re-reads the configuration.
    pub async fn post<F, R>(&self, act: Act, form: &[u8], same_origin: bool, reload: F) -> Reply
    where
        F: FnOnce() -> R,
        R: Future<Output = Result<Vec<&'static str>, Vec<String>>>,
    {
        let token = form_urlencoded::parse(form)
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let token_ok = bool::from(token.as_bytes().ct_eq(self.csrf.as_bytes()));
        if !same_origin || !token_ok {
            let path = format!("/.portcullis/console/{}", Self::action_path(&act));
            self.audit.refusal(
                &self.viewer,
                portcullis_config::CONSOLE_ROUTE,
                None,
                "a console form not sent from the console itself",
                &crate::audit::Request {
                    method: "POST",
                    path: &path,
                    client: self.viewer_ip,
                },
                None,
            );
            return self.page(
                StatusCode::FORBIDDEN,
                "Refused",
                "<p>This form was not sent from the console itself, so nothing was done. Open \
                 the console and use its own buttons.</p>",
            );
        }
        let (title, content) = match act {
            Act::EndSessions(user) => {
                let ended = match self.sessions_of(&user).await {
                    Ok(keys) => self.sessions.end(&keys).await.map(|()| keys),
                    Err(e) => Err(e),
                };
                let outcome = match ended {
                    Ok(keys) => format!(
                        "ended {} session{}",
                        keys.len(),
                        if keys.len() == 1 { "" } else { "s" }
                    ),
                    Err(e) => format!("failed: {e}"),
                };
                self.audit.action(
                    &self.viewer,
                    "end_sessions",
                    &user.user_name,
                    &outcome,
                    self.viewer_ip,
                );
                (
                    format!("{}'s sessions", user.user_name),
                    format!(
                        "<p>{}: {}.</p><p><a href=\"{}\">Back to {}</a></p>",
                        escape(&user.user_name),
                        escape(&outcome),
                        link(&format!("users/{}", format_id(user.id))),
                        escape(&user.user_name)
                    ),
                )
            }
            Act::Reload => {
                let (outcome, content) = match reload().await {
                    Ok(awaiting) if awaiting.is_empty() => (
                        "reloaded".to_owned(),
                        "<p>The configuration was read again and is in use.</p>".to_owned(),
                    ),
                    Ok(awaiting) => {
                        let list: String = awaiting
                            .iter()
                            .map(|name| format!("<li><code>{}</code></li>", escape(name)))
                            .collect();
                        (
                            format!("reloaded; waiting for a restart: {}", awaiting.join(", ")),
                            format!(
                                "<p>The configuration was read again and is in use, except \
                                 these settings: they differ from the ones Portcullis started \
                                 with and take effect only after a restart.</p>\
                                 <ul class=\"no\">{list}</ul>"
                            ),
                        )
                    }
                    Err(problems) => {
                        let list: String = problems
                            .iter()
                            .map(|p| format!("<li>{}</li>", escape(p)))
                            .collect();
                        (
                            format!(
                                "not reloaded: {} problem{}",
                                problems.len(),
                                if problems.len() == 1 { "" } else { "s" }
                            ),
                            format!(
                                "<p class=\"no\">The file has problems, so nothing changed:</p><ul>{list}</ul>"
                            ),
                        )
                    }
                };
                self.audit.action(
                    &self.viewer,
                    "reload",
                    &self.config_path.display().to_string(),
                    &outcome,
                    self.viewer_ip,
                );
                ("Configuration".to_owned(), content)
            }
        };
        self.page(StatusCode::OK, &title, &content)
    }

    fn page(&self, status: StatusCode, title: &str, content: &str) -> Reply {
        Reply::html(status, document(title, &self.bar(""), content))
    }
}

/// The sessions held here of the person who signs in as `user`: all of them, to be ended.
fn sessions_of(sessions: &Sessions, runtime: &Runtime, user: &UserEntry) -> Vec<SessionKey> {
    let found = directory::sessions_of(sessions, &runtime.config.identity, user);
    found.into_iter().map(|(key, _)| key).collect()
}
