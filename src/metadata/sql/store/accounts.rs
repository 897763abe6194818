//! Accounts ([`AccountStore`]): users, API keys, usage and the token secret.

use async_trait::async_trait;
use uuid::Uuid;

use super::D;
use crate::metadata::rows::{from_column, sql_error};
use crate::metadata::sql::dialect::Dialect;
use crate::metadata::sql::{SqlStore, Statement};
use crate::metadata::{
    AccountStore, ApiKey, Limit, MetaResult, NewApiKey, NewUser, QuotaOverride, Role, Usage, User, UserCredentials,
};

/// The columns of a user, in [`UserRow`]'s order.
macro_rules! user_columns {
    () => {
        "u.id, u.username, u.password_hash, u.role, u.disabled, u.quota_bytes, u.quota_images, u.used_bytes,
         u.used_images, u.external_subject, u.created_at"
    };
}

macro_rules! key_columns {
    () => {
        "k.id AS key_id, k.user_id, k.name, k.prefix, k.created_at AS key_created_at, k.last_used_at, k.revoked_at"
    };
}

/// `ON CONFLICT DO NOTHING` covers both unique columns: a taken username or external subject
/// inserts nothing, which the caller reports, instead of failing the transaction.
static CREATE_USER: Statement = Statement::new(
    "INSERT INTO users (id, username, password_hash, role, external_subject, created_at)
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
);

static FIND_USER: Statement = Statement::new(concat!("SELECT ", user_columns!(), " FROM users AS u WHERE u.id = $1"));
static FIND_USER_BY_NAME: Statement =
    Statement::new(concat!("SELECT ", user_columns!(), " FROM users AS u WHERE u.username = $1"));
static FIND_USER_BY_EXTERNAL_SUBJECT: Statement =
    Statement::new(concat!("SELECT ", user_columns!(), " FROM users AS u WHERE u.external_subject = $1"));
static LIST_USERS: Statement =
    Statement::new(concat!("SELECT ", user_columns!(), " FROM users AS u ORDER BY u.username"));
static FIRST_ADMIN: Statement = Statement::new(concat!(
    "SELECT ",
    user_columns!(),
    " FROM users AS u WHERE u.role = 'admin' ORDER BY u.created_at, u.id LIMIT 1"
));

static SET_QUOTA: Statement =
    Statement::new("UPDATE users SET quota_bytes = $2, quota_images = $3 WHERE username = $1");
static SET_DISABLED: Statement = Statement::new("UPDATE users SET disabled = $2 WHERE username = $1");

static CREATE_API_KEY: Statement = Statement::new(
    "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
);
static FIND_API_KEY: Statement = Statement::new(concat!(
    "SELECT ",
    key_columns!(),
    ", ",
    user_columns!(),
    " FROM api_keys AS k JOIN users AS u ON u.id = k.user_id WHERE k.key_hash = $1 AND k.revoked_at IS NULL"
));
static TOUCH_API_KEY: Statement = Statement::new("UPDATE api_keys SET last_used_at = {now} WHERE id = $1");
static LIST_API_KEYS: Statement = Statement::new(concat!(
    "SELECT ",
    key_columns!(),
    " FROM api_keys AS k WHERE k.user_id = $1 ORDER BY k.created_at DESC, k.id DESC"
));
static REVOKE_API_KEY: Statement = Statement::new(
    "UPDATE api_keys SET revoked_at = {now} WHERE id = $2 AND ($1 IS NULL OR user_id = $1) AND revoked_at IS NULL",
);

static CREATE_AUTH_SECRET: Statement = Statement::new(
    "INSERT INTO auth_secret (singleton, secret, created_at) VALUES (1, $1, {now}) ON CONFLICT (singleton) DO NOTHING",
);
static AUTH_SECRET: Statement = Statement::new("SELECT secret FROM auth_secret WHERE singleton = 1");

static ADOPT_UNOWNED_IMAGES: Statement = Statement::new("UPDATE images SET owner_id = $1 WHERE owner_id IS NULL");
/// Usage recounted from the images themselves, after adoption changed them in bulk.
static RECOUNT_USAGE: Statement = Statement::new(
    "UPDATE users SET
        used_bytes = (SELECT COALESCE(SUM(file_size), 0) FROM images WHERE owner_id = $1),
        used_images = (SELECT COUNT(*) FROM images WHERE owner_id = $1)
     WHERE id = $1",
);

#[async_trait]
impl AccountStore for SqlStore<D> {
    async fn create_user(&self, user: &NewUser) -> MetaResult<Option<User>> {
        const CONTEXT: &str = "creating a user";
        let created = sqlx::query(CREATE_USER.sql::<D>())
            .bind(D::id(user.id))
            .bind(&user.username)
            .bind(user.password_hash.as_deref())
            .bind(user.role.as_str())
            .bind(user.external_subject.as_deref())
            .bind(D::time(user.created_at))
            .execute(&self.pool)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        if created == 0 {
            return Ok(None);
        }
        self.find_user(user.id).await
    }

    async fn find_user(&self, id: Uuid) -> MetaResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(FIND_USER.sql::<D>())
            .bind(D::id(id))
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("reading a user"))?;
        row.map(UserRow::into_user).transpose()
    }

    async fn find_user_by_name(&self, username: &str) -> MetaResult<Option<UserCredentials>> {
        let row: Option<UserRow> = sqlx::query_as(FIND_USER_BY_NAME.sql::<D>())
            .bind(username)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("reading a user by name"))?;
        row.map(|row| {
            let password_hash = row.password_hash.clone();
            Ok(UserCredentials { user: row.into_user()?, password_hash })
        })
        .transpose()
    }

    async fn find_user_by_external_subject(&self, subject: &str) -> MetaResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(FIND_USER_BY_EXTERNAL_SUBJECT.sql::<D>())
            .bind(subject)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("reading an external user"))?;
        row.map(UserRow::into_user).transpose()
    }

    async fn list_users(&self) -> MetaResult<Vec<User>> {
        let rows: Vec<UserRow> =
            sqlx::query_as(LIST_USERS.sql::<D>()).fetch_all(&self.pool).await.map_err(sql_error("listing users"))?;
        rows.into_iter().map(UserRow::into_user).collect()
    }

    async fn first_admin(&self) -> MetaResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(FIRST_ADMIN.sql::<D>())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("looking for an admin"))?;
        row.map(UserRow::into_user).transpose()
    }

    async fn set_quota(&self, username: &str, quota: QuotaOverride) -> MetaResult<bool> {
        let changed = sqlx::query(SET_QUOTA.sql::<D>())
            .bind(username)
            .bind(limit_column(quota.bytes))
            .bind(limit_column(quota.images))
            .execute(&self.pool)
            .await
            .map_err(sql_error("setting a quota"))?
            .rows_affected();
        Ok(changed == 1)
    }

    async fn set_disabled(&self, username: &str, disabled: bool) -> MetaResult<bool> {
        let changed = sqlx::query(SET_DISABLED.sql::<D>())
            .bind(username)
            .bind(disabled)
            .execute(&self.pool)
            .await
            .map_err(sql_error("disabling a user"))?
            .rows_affected();
        Ok(changed == 1)
    }

    async fn create_api_key(&self, key: &NewApiKey) -> MetaResult<ApiKey> {
        sqlx::query(CREATE_API_KEY.sql::<D>())
            .bind(D::id(key.id))
            .bind(D::id(key.user_id))
            .bind(&key.name)
            .bind(&key.key_hash)
            .bind(&key.prefix)
            .bind(D::time(key.created_at))
            .execute(&self.pool)
            .await
            .map_err(sql_error("creating an API key"))?;
        Ok(ApiKey {
            id: key.id,
            user_id: key.user_id,
            name: key.name.clone(),
            prefix: key.prefix.clone(),
            created_at: key.created_at,
            last_used_at: None,
            revoked_at: None,
        })
    }

    async fn find_api_key(&self, key_hash: &str) -> MetaResult<Option<(ApiKey, User)>> {
        let row: Option<KeyWithUserRow> = sqlx::query_as(FIND_API_KEY.sql::<D>())
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error("looking up an API key"))?;
        row.map(|row| Ok((row.key.into_key()?, row.user.into_user()?))).transpose()
    }

    async fn touch_api_key(&self, id: Uuid) -> MetaResult<()> {
        sqlx::query(TOUCH_API_KEY.sql::<D>())
            .bind(D::id(id))
            .execute(&self.pool)
            .await
            .map_err(sql_error("recording an API key's use"))?;
        Ok(())
    }

    async fn list_api_keys(&self, user_id: Uuid) -> MetaResult<Vec<ApiKey>> {
        let rows: Vec<KeyRow> = sqlx::query_as(LIST_API_KEYS.sql::<D>())
            .bind(D::id(user_id))
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error("listing API keys"))?;
        rows.into_iter().map(KeyRow::into_key).collect()
    }

    async fn revoke_api_key(&self, user_id: Option<Uuid>, key_id: Uuid) -> MetaResult<bool> {
        let revoked = sqlx::query(REVOKE_API_KEY.sql::<D>())
            .bind(user_id.map(D::id))
            .bind(D::id(key_id))
            .execute(&self.pool)
            .await
            .map_err(sql_error("revoking an API key"))?
            .rows_affected();
        Ok(revoked == 1)
    }

    async fn auth_secret(&self, candidate: &str) -> MetaResult<String> {
        const CONTEXT: &str = "reading the token secret";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        sqlx::query(CREATE_AUTH_SECRET.sql::<D>())
            .bind(candidate)
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?;
        let secret: String =
            sqlx::query_scalar(AUTH_SECRET.sql::<D>()).fetch_one(&mut *tx).await.map_err(sql_error(CONTEXT))?;
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(secret)
    }

    async fn adopt_unowned_images(&self, owner: Uuid) -> MetaResult<u64> {
        const CONTEXT: &str = "giving unowned images to the first admin";
        let mut tx = D::begin_write(&self.pool, CONTEXT).await?;
        let adopted = sqlx::query(ADOPT_UNOWNED_IMAGES.sql::<D>())
            .bind(D::id(owner))
            .execute(&mut *tx)
            .await
            .map_err(sql_error(CONTEXT))?
            .rows_affected();
        if adopted > 0 {
            sqlx::query(RECOUNT_USAGE.sql::<D>())
                .bind(D::id(owner))
                .execute(&mut *tx)
                .await
                .map_err(sql_error(CONTEXT))?;
        }
        tx.commit().await.map_err(sql_error(CONTEXT))?;
        Ok(adopted)
    }
}

/// A limit as its column keeps it: NULL follows the default, `i64::MAX` is unlimited.
fn limit_column(limit: Option<Limit>) -> Option<i64> {
    limit.map(|limit| match limit {
        Limit::At(value) => i64::try_from(value).unwrap_or(i64::MAX),
        Limit::Unlimited => i64::MAX,
    })
}

fn limit_from_column(column: Option<i64>, name: &'static str) -> MetaResult<Option<Limit>> {
    column
        .map(|value| if value == i64::MAX { Ok(Limit::Unlimited) } else { from_column(value, name).map(Limit::At) })
        .transpose()
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: <D as Dialect>::Id,
    username: String,
    password_hash: Option<String>,
    role: String,
    disabled: bool,
    quota_bytes: Option<i64>,
    quota_images: Option<i64>,
    used_bytes: i64,
    used_images: i64,
    external_subject: Option<String>,
    created_at: <D as Dialect>::Time,
}

impl UserRow {
    fn into_user(self) -> MetaResult<User> {
        Ok(User {
            id: D::parse_id(self.id)?,
            username: self.username,
            role: Role::parse(&self.role)?,
            disabled: self.disabled,
            quota: QuotaOverride {
                bytes: limit_from_column(self.quota_bytes, "quota_bytes")?,
                images: limit_from_column(self.quota_images, "quota_images")?,
            },
            usage: Usage {
                bytes: from_column(self.used_bytes, "used_bytes")?,
                images: from_column(self.used_images, "used_images")?,
            },
            external_subject: self.external_subject,
            created_at: D::parse_time(self.created_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    key_id: <D as Dialect>::Id,
    user_id: <D as Dialect>::Id,
    name: String,
    prefix: String,
    key_created_at: <D as Dialect>::Time,
    last_used_at: Option<<D as Dialect>::Time>,
    revoked_at: Option<<D as Dialect>::Time>,
}

impl KeyRow {
    fn into_key(self) -> MetaResult<ApiKey> {
        Ok(ApiKey {
            id: D::parse_id(self.key_id)?,
            user_id: D::parse_id(self.user_id)?,
            name: self.name,
            prefix: self.prefix,
            created_at: D::parse_time(self.key_created_at)?,
            last_used_at: self.last_used_at.map(D::parse_time).transpose()?,
            revoked_at: self.revoked_at.map(D::parse_time).transpose()?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct KeyWithUserRow {
    #[sqlx(flatten)]
    key: KeyRow,
    #[sqlx(flatten)]
    user: UserRow,
}
