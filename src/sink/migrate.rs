//! mqbridge's own schema (the `migrations/` folder), embedded in the binary and applied by
//! sinks configured with `migrate: true`. Numbered files, tracked in `_mqbridge_migrations`
//! so they never collide with an application's own migration history.

use std::borrow::Cow;

use sqlx::migrate::{Migrate, MigrateError, Migration, MigrationType, Migrator};

/// One embedded migration: version, description, SQL.
pub type Embedded = (i64, &'static str, &'static str);

pub const SQLITE: &[Embedded] = &[(
    1,
    "mqbridge_messages",
    include_str!("../../migrations/sqlite/0001_mqbridge_messages.sql"),
)];

pub const POSTGRES: &[Embedded] = &[
    (
        1,
        "mqbridge_messages",
        include_str!("../../migrations/postgres/0001_mqbridge_messages.sql"),
    ),
    (
        2,
        "mqbridge_dead_letters",
        include_str!("../../migrations/postgres/0002_mqbridge_dead_letters.sql"),
    ),
];

/// Applies `list` through `conn` (a pool or connection), skipping what was applied before.
pub async fn apply<'a, A>(list: &[Embedded], conn: A) -> Result<(), MigrateError>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: Migrate,
{
    let migrations = list
        .iter()
        .map(|(v, d, sql)| {
            Migration::new(
                *v,
                Cow::Borrowed(*d),
                MigrationType::Simple,
                sqlx::SqlStr::from_static(sql),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name("_mqbridge_migrations");
    migrator.run(conn).await
}
