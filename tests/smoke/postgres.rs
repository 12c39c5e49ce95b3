//! PostgreSQL: write a row to a uniquely named temporary table and read it back.

use anyhow::Context as _;
use e2e::{Server, require, unique_name, within};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

use crate::STEP;

const PG: Server = Server::Postgres;

#[tokio::test]
async fn postgres_round_trip() -> anyhow::Result<()> {
    let url = require(PG)?;
    let pool = within(
        PG,
        "a pool connection",
        STEP,
        PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(STEP)
            .connect(&url),
    )
    .await?
    .map_err(|e| PG.unreachable(e))?;

    // A temporary table lives in one session: keep every statement in one transaction.
    let table = unique_name("e2e_smoke");
    let mut tx = within(PG, "begin", STEP, pool.begin())
        .await?
        .context("PostgreSQL: begin")?;
    within(
        PG,
        "create temp table",
        STEP,
        sqlx::query(AssertSqlSafe(format!(
            "create temp table {table} (id bigint primary key, body text not null) on commit drop"
        )))
        .execute(&mut *tx),
    )
    .await?
    .with_context(|| format!("PostgreSQL: create temp table {table}"))?;

    let (id, body) = (42_i64, format!("hello from {table}"));
    let inserted = within(
        PG,
        "insert",
        STEP,
        sqlx::query(AssertSqlSafe(format!(
            "insert into {table} (id, body) values ($1, $2)"
        )))
        .bind(id)
        .bind(&body)
        .execute(&mut *tx),
    )
    .await?
    .with_context(|| format!("PostgreSQL: insert into {table}"))?;
    assert_eq!(inserted.rows_affected(), 1);

    let row: (i64, String) = within(
        PG,
        "select",
        STEP,
        sqlx::query_as(AssertSqlSafe(format!(
            "select id, body from {table} where id = $1"
        )))
        .bind(id)
        .fetch_one(&mut *tx),
    )
    .await?
    .with_context(|| format!("PostgreSQL: select from {table}"))?;
    assert_eq!(row, (id, body));

    within(PG, "commit", STEP, tx.commit())
        .await?
        .context("PostgreSQL: commit")?;
    within(PG, "pool close", STEP, pool.close()).await?;
    Ok(())
}
