//! The open transaction behind a claimed batch.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};

use crate::connect::connection;
use crate::PgError;

/// A pooled connection with an open claim transaction.
///
/// The row locks taken by `FOR UPDATE` live as long as this transaction, and
/// the lane locks until just after it.
/// Dropping the guard before the source acknowledged the claim detaches the connection
/// from the pool and closes it, so the server rolls the transaction back and
/// every claimed event stays pending; a connection with an open transaction
/// is never handed to another user of the pool.
#[derive(Debug)]
pub struct PgClaim {
    conn: Option<Object>,
    pub(crate) ids: Vec<i64>,
    /// Where each claimed row is (`ctid`), in the order of `ids`; empty for
    /// sources that address rows by id only.
    pub(crate) tids: Vec<Tid>,
    /// Lane locks (session-level advisory locks in `lock_namespace`) held
    /// until the transaction ends.
    pub(crate) lanes: Vec<i32>,
    /// For each lane of `lanes`, the last seq claimed in it: an extension of
    /// the claim reads the lane past it.
    pub(crate) watermarks: std::collections::BTreeMap<i32, i64>,
    pub(crate) lock_namespace: i32,
}

impl PgClaim {
    /// Opens a claim transaction and runs the claim query `sql` in it, in
    /// one round trip: `BEGIN`, its settings and the query are pipelined.
    ///
    /// Postgres ends the session if it stays idle in the transaction for
    /// longer than `claim_timeout`; `settings` are further `SET LOCAL`
    /// statements. Statements are prepared once per connection; each still
    /// gets a plan made for its parameters (`plan_cache_mode`), since a
    /// generic plan knows neither the batch size nor the arrays.
    pub(crate) async fn open(
        pool: &Pool,
        target: &str,
        claim_timeout: Duration,
        settings: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(Self, Vec<tokio_postgres::Row>), PgError> {
        let conn = connection(pool, target).await?;
        let statement = conn
            .prepare_cached(sql)
            .await
            .map_err(|e| PgError::query("claim (prepare)", e))?;
        let claim = Self {
            conn: Some(conn),
            ids: Vec::new(),
            tids: Vec::new(),
            lanes: Vec::new(),
            watermarks: std::collections::BTreeMap::new(),
            lock_namespace: 0,
        };
        let begin = format!(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}; SET LOCAL TIME ZONE 'UTC'; \
             SET LOCAL plan_cache_mode = force_custom_plan; {settings}",
            claim_timeout.as_millis()
        );
        let client = claim.client()?;
        // Polled in this order (`biased`), so the server runs BEGIN and the
        // settings before the query. If BEGIN fails, so does the query, and
        // dropping the guard closes the connection.
        let (begun, rows) = tokio::join!(
            biased;
            client.batch_execute(&begin),
            client.query(&statement, params),
        );
        begun.map_err(|e| PgError::query("claim (begin)", e))?;
        let rows = rows.map_err(|e| PgError::query("claim", e))?;
        Ok((claim, rows))
    }

    /// Runs one acknowledgement statement for `rows` claimed rows in the
    /// claim transaction (nothing when there are none) and returns how many
    /// rows it changed.
    pub(crate) async fn execute_for(
        &self,
        operation: &'static str,
        sql: &str,
        rows: usize,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, PgError> {
        if rows == 0 {
            return Ok(0);
        }
        let (client, statement) = self.prepared(operation, sql).await?;
        client
            .execute(&statement, params)
            .await
            .map_err(|e| PgError::query(operation, e))
    }

    /// The claim's connection and `sql` prepared on it (once per connection).
    async fn prepared(
        &self,
        operation: &'static str,
        sql: &str,
    ) -> Result<(&Object, tokio_postgres::Statement), PgError> {
        let client = self.client()?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| PgError::query(operation, e))?;
        Ok((client, statement))
    }

    /// Runs a further query of the claim in its transaction.
    pub(crate) async fn query(
        &self,
        operation: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        let (client, statement) = self.prepared(operation, sql).await?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| PgError::query(operation, e))
    }

    pub(crate) fn client(&self) -> Result<&Object, PgError> {
        self.conn
            .as_ref()
            .ok_or_else(|| PgError::Config("claim already finished".into()))
    }

    /// Rolls back and releases every advisory lock of the session, for a
    /// claim that found nothing; the connection goes back to the pool.
    pub(crate) async fn release_all_lanes_and_rollback(mut self) -> Result<(), PgError> {
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        match conn
            .batch_execute("ROLLBACK; SELECT pg_advisory_unlock_all()")
            .await
        {
            Ok(()) => Ok(()),
            Err(err) => {
                let _ = Object::take(conn);
                Err(PgError::query("claim (rollback)", err))
            }
        }
    }

    /// Ends the transaction with `COMMIT` or `ROLLBACK`, then releases the
    /// lane locks (only after the end, so the next claim of a lane sees this
    /// one's result), and returns the connection to the pool.
    pub(crate) async fn finish(mut self, commit: bool) -> Result<(), PgError> {
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        let mut sql = String::from(if commit { "COMMIT" } else { "ROLLBACK" });
        if !self.lanes.is_empty() {
            // Integers only: safe to inline. Statements of one simple query
            // stop at the first error, and the error path below closes the
            // connection, which releases the locks too.
            let lanes: Vec<String> = self.lanes.iter().map(i32::to_string).collect();
            sql.push_str(&format!(
                "; SELECT pg_advisory_unlock({}, l) FROM unnest('{{{}}}'::int[]) AS u(l)",
                self.lock_namespace,
                lanes.join(",")
            ));
        }
        match conn.batch_execute(&sql).await {
            Ok(()) => Ok(()),
            Err(err) => {
                // The transaction state is unknown: never reuse this connection.
                let _ = Object::take(conn);
                Err(PgError::query(
                    if commit {
                        "claim (commit)"
                    } else {
                        "claim (rollback)"
                    },
                    err,
                ))
            }
        }
    }
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing the connection rolls the transaction back server-side.
            drop(Object::take(conn));
        }
    }
}

/// A row's physical address, its `ctid`.
///
/// Stable while the claim transaction holds the row's `FOR UPDATE` lock: no
/// other transaction can update or delete the row, and `VACUUM FULL` or
/// `CLUSTER`, which move rows, wait for the table lock the claim holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tid {
    block: u32,
    offset: u16,
}

impl<'a> FromSql<'a> for Tid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        // Binary format: block number (4 bytes) then line pointer (2 bytes), big-endian.
        match raw {
            [b0, b1, b2, b3, o0, o1] => Ok(Tid {
                block: u32::from_be_bytes([*b0, *b1, *b2, *b3]),
                offset: u16::from_be_bytes([*o0, *o1]),
            }),
            _ => Err(format!("a tid is 6 bytes, got {}", raw.len()).into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }
}

impl ToSql for Tid {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u32(self.block);
        out.put_u16(self.offset);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }

    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_round_trips_in_the_binary_format() -> Result<(), Box<dyn std::error::Error + Sync + Send>>
    {
        let tid = Tid {
            block: 0x0102_0304,
            offset: 0x0506,
        };
        let mut out = BytesMut::new();
        tid.to_sql(&Type::TID, &mut out)?;
        assert_eq!(&out[..], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(Tid::from_sql(&Type::TID, &out)?, tid);
        assert!(Tid::from_sql(&Type::TID, &[0; 5]).is_err());
        assert!(!<Tid as ToSql>::accepts(&Type::INT8));
        Ok(())
    }
}
