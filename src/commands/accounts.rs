//! `chitram users …` and `chitram keys …`: accounts managed from the operator's shell, against
//! the same database as the servers, no server needed.

use std::fmt::Write;
use std::sync::Arc;

use uuid::Uuid;

use super::{CommandError, Outcome};
use crate::accounts::{Accounts, AuthError};
use crate::app;
use crate::config::Settings;
use crate::metadata::{Limit, MetadataStore, QuotaOverride, Role, User};

/// What `users set-quota` sets one limit to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaArg {
    /// Follow `auth.default_quota_*`.
    Default,
    Set(Limit),
}

impl std::str::FromStr for QuotaArg {
    type Err = String;

    /// `default`, `unlimited`, or a number with an optional KiB/MiB/GiB/TiB suffix.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.to_ascii_lowercase().as_str() {
            "default" => return Ok(QuotaArg::Default),
            "unlimited" => return Ok(QuotaArg::Set(Limit::Unlimited)),
            _ => {}
        }
        let units = [("tib", 1u64 << 40), ("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("", 1)];
        let lower = text.to_ascii_lowercase();
        for (suffix, factor) in units {
            if let Some(number) = lower.strip_suffix(suffix)
                && let Ok(value) = number.trim().parse::<u64>()
            {
                return value
                    .checked_mul(factor)
                    .map(|value| QuotaArg::Set(Limit::At(value)))
                    .ok_or_else(|| format!("{text:?} is too large"));
            }
        }
        Err(format!("{text:?} is not a number (optionally with KiB, MiB, GiB or TiB), `default` or `unlimited`"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountCommandError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot set up accounts")]
    Accounts(#[from] crate::accounts::service::AccountsStartError),
    #[error("no user is called {0:?}: `chitram users list` shows who there is")]
    NoSuchUser(String),
    #[error("no live API key has the id {0}: `chitram keys list --user NAME` shows a user's keys")]
    NoSuchKey(Uuid),
}

impl From<crate::metadata::MetadataError> for AccountCommandError {
    fn from(error: crate::metadata::MetadataError) -> Self {
        AccountCommandError::Command(error.into())
    }
}

type Result<T, E = AccountCommandError> = std::result::Result<T, E>;

async fn open(settings: &Settings) -> Result<(Arc<dyn MetadataStore>, Accounts)> {
    let metadata = app::open_existing_metadata(&settings.database.url).await.map_err(CommandError::from)?;
    let accounts = Accounts::new(&settings.auth, metadata.clone()).await?;
    Ok((metadata, accounts))
}

async fn user_named(metadata: &dyn MetadataStore, name: &str) -> Result<User> {
    let found = metadata.find_user_by_name(name).await?;
    found.map(|found| found.user).ok_or_else(|| AccountCommandError::NoSuchUser(name.to_owned()))
}

/// `chitram users create NAME [--admin] [--password-stdin]`: the user, and a first API key.
pub async fn create_user(settings: &Settings, name: &str, admin: bool, password: Option<String>) -> Result<Outcome> {
    let (_, accounts) = open(settings).await?;
    let role = if admin { Role::Admin } else { Role::User };
    let user = accounts.create_user(name, password.as_deref(), role).await?;
    let (key, secret) = accounts.create_key_for(user.id, "created with the user").await?;
    let mut report = format!("created {} {:?} ({})\n", role.as_str(), user.username, user.id);
    let _ = writeln!(report, "API key {} (shown once; send it as `Authorization: Bearer <key>`):\n{secret}", key.id);
    Ok(Outcome { report, ok: true })
}

/// `chitram users list`.
pub async fn list_users(settings: &Settings) -> Result<Outcome> {
    let (metadata, accounts) = open(settings).await?;
    let mut report =
        format!("{:<24} {:<6} {:<9} {:>22} {:>20}\n", "user", "role", "state", "bytes used/quota", "images used/quota");
    for user in metadata.list_users().await? {
        let account = accounts.account_of(user);
        let user = &account.user;
        let limit = |value: Option<u64>| value.map_or("∞".to_owned(), |v| v.to_string());
        let _ = writeln!(
            report,
            "{:<24} {:<6} {:<9} {:>22} {:>20}",
            user.username,
            user.role.as_str(),
            if user.disabled { "disabled" } else { "active" },
            format!("{}/{}", user.usage.bytes, limit(account.quota.bytes)),
            format!("{}/{}", user.usage.images, limit(account.quota.images)),
        );
    }
    Ok(Outcome { report, ok: true })
}

/// `chitram users set-quota NAME [--bytes …] [--images …]`: only the limits given change.
pub async fn set_quota(
    settings: &Settings,
    name: &str,
    bytes: Option<QuotaArg>,
    images: Option<QuotaArg>,
) -> Result<Outcome> {
    let (metadata, accounts) = open(settings).await?;
    let user = user_named(metadata.as_ref(), name).await?;
    let apply = |current: Option<Limit>, change: Option<QuotaArg>| match change {
        None => current,
        Some(QuotaArg::Default) => None,
        Some(QuotaArg::Set(limit)) => Some(limit),
    };
    let quota = QuotaOverride { bytes: apply(user.quota.bytes, bytes), images: apply(user.quota.images, images) };
    metadata.set_quota(name, quota).await?;
    let account = accounts.account_of(user_named(metadata.as_ref(), name).await?);
    let shown = |value: Option<u64>| value.map_or("unlimited".to_owned(), |v| v.to_string());
    let report = format!(
        "{name:?} may now store {} bytes and {} images\n",
        shown(account.quota.bytes),
        shown(account.quota.images)
    );
    Ok(Outcome { report, ok: true })
}

/// `chitram users disable|enable NAME`. A server trusts a credential it checked for up to
/// `auth.credential_cache_secs` more.
pub async fn set_disabled(settings: &Settings, name: &str, disabled: bool) -> Result<Outcome> {
    let (metadata, _) = open(settings).await?;
    if !metadata.set_disabled(name, disabled).await? {
        return Err(AccountCommandError::NoSuchUser(name.to_owned()));
    }
    let state = if disabled { "disabled: their keys and tokens stop working" } else { "enabled" };
    let report = format!("{name:?} is {state} (servers notice within auth.credential_cache_secs)\n");
    Ok(Outcome { report, ok: true })
}

/// `chitram keys create --user NAME [--name LABEL]`.
pub async fn create_key(settings: &Settings, user: &str, name: &str) -> Result<Outcome> {
    let (metadata, accounts) = open(settings).await?;
    let user = user_named(metadata.as_ref(), user).await?;
    let (key, secret) = accounts.create_key_for(user.id, name).await?;
    let report = format!("API key {} for {:?} (shown once):\n{secret}\n", key.id, user.username);
    Ok(Outcome { report, ok: true })
}

/// `chitram keys list --user NAME`.
pub async fn list_keys(settings: &Settings, user: &str) -> Result<Outcome> {
    let (metadata, _) = open(settings).await?;
    let user = user_named(metadata.as_ref(), user).await?;
    let mut report = format!("{:<36}  {:<12}  {:<8}  {:<20}  name\n", "id", "prefix", "state", "last used");
    for key in metadata.list_api_keys(user.id).await? {
        let state = if key.revoked_at.is_some() { "revoked" } else { "live" };
        let used = key.last_used_at.map_or("never".to_owned(), |at| at.format("%Y-%m-%d %H:%M:%S").to_string());
        let _ = writeln!(report, "{:<36}  {:<12}  {:<8}  {:<20}  {}", key.id, key.prefix, state, used, key.name);
    }
    Ok(Outcome { report, ok: true })
}

/// `chitram keys revoke ID`.
pub async fn revoke_key(settings: &Settings, id: Uuid) -> Result<Outcome> {
    let (metadata, _) = open(settings).await?;
    if !metadata.revoke_api_key(None, id).await? {
        return Err(AccountCommandError::NoSuchKey(id));
    }
    let report = format!("revoked {id} (servers notice within auth.credential_cache_secs)\n");
    Ok(Outcome { report, ok: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_arguments() {
        assert_eq!("default".parse(), Ok(QuotaArg::Default));
        assert_eq!("unlimited".parse(), Ok(QuotaArg::Set(Limit::Unlimited)));
        assert_eq!("1000".parse(), Ok(QuotaArg::Set(Limit::At(1000))));
        assert_eq!("2GiB".parse(), Ok(QuotaArg::Set(Limit::At(2 << 30))));
        assert_eq!("5 mib".parse(), Ok(QuotaArg::Set(Limit::At(5 << 20))));
        assert!("lots".parse::<QuotaArg>().is_err());
        assert!("-1".parse::<QuotaArg>().is_err());
        assert!("99999999999TiB".parse::<QuotaArg>().is_err());
    }
}
