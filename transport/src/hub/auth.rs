//! Pluggable authentication for the hub's handshake.

use std::collections::HashSet;

use futures::future::BoxFuture;

use crate::protocol::ClientId;

/// Why an authenticator refused a client. Sent to the client as a permanent `auth_rejected`
/// (or `auth_required`) error frame, after which the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRejection {
    /// The hello carried no token and one is required.
    Missing,
    /// The token was refused, with a reason safe to show the client.
    Invalid(String),
}

/// Decides whether a hello may open a session. Called once per connection, before the welcome.
///
/// Returns a future so that implementations can ask an external service; it runs on the hub
/// worker that owns the connection.
pub trait Authenticator: Send + Sync + 'static {
    /// Accepts or rejects `client_id` presenting `token`.
    fn authenticate(
        &self,
        client_id: &ClientId,
        token: Option<&str>,
    ) -> BoxFuture<'static, Result<(), AuthRejection>>;
}

/// Accepts everyone. The default, for development and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(
        &self,
        _client_id: &ClientId,
        _token: Option<&str>,
    ) -> BoxFuture<'static, Result<(), AuthRejection>> {
        Box::pin(futures::future::ready(Ok(())))
    }
}

/// Accepts exactly the tokens it was given.
#[derive(Debug, Clone, Default)]
pub struct StaticTokens {
    tokens: HashSet<String>,
}

impl StaticTokens {
    /// An authenticator accepting any of `tokens`.
    pub fn new<I, S>(tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StaticTokens {
            tokens: tokens.into_iter().map(Into::into).collect(),
        }
    }
}

impl Authenticator for StaticTokens {
    fn authenticate(
        &self,
        _client_id: &ClientId,
        token: Option<&str>,
    ) -> BoxFuture<'static, Result<(), AuthRejection>> {
        let result = match token {
            None => Err(AuthRejection::Missing),
            Some(t) if self.tokens.contains(t) => Ok(()),
            Some(_) => Err(AuthRejection::Invalid("unknown token".into())),
        };
        Box::pin(futures::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_tokens_accept_only_known_tokens() {
        let auth = StaticTokens::new(["good"]);
        let id = ClientId("c".into());
        assert_eq!(auth.authenticate(&id, Some("good")).await, Ok(()));
        assert_eq!(
            auth.authenticate(&id, Some("bad")).await,
            Err(AuthRejection::Invalid("unknown token".into()))
        );
        assert_eq!(
            auth.authenticate(&id, None).await,
            Err(AuthRejection::Missing)
        );
        assert_eq!(AllowAll.authenticate(&id, None).await, Ok(()));
    }
}
