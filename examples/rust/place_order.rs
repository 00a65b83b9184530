//! A service that places an order: the business row and its outbox row in one Postgres
//! transaction (the same thing as `examples/place_order.sql`, from Rust). Either both commit or
//! neither does; outbox-relay publishes the outbox row to `outbox.event.order`.
//!
//! ```sh
//! psql "$DATABASE_URL" -f sql/001_outbox.sql -f examples/orders_schema.sql
//! DATABASE_URL=postgres://app@localhost/app cargo run --example place_order -- alice 42.50
//! ```
//! Prints the order id and the outbox row (message) id.

use std::process::ExitCode;

async fn place_order(
    db: &mut tokio_postgres::Client,
    customer: &str,
    total: &str,
) -> Result<(i64, uuid::Uuid), tokio_postgres::Error> {
    let tx = db.transaction().await?;
    let order: i64 = tx
        .query_one(
            "INSERT INTO orders (customer, total) VALUES ($1, $2::text::numeric) RETURNING id",
            &[&customer, &total],
        )
        .await?
        .get(0);
    let payload = serde_json::json!({ "order_id": order, "customer": customer, "total": total });
    let message: uuid::Uuid = tx
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ('order', $1, 'OrderPlaced', $2, '{\"source\": \"place_order.rs\"}') \
             RETURNING id",
            &[&order.to_string(), &payload],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok((order, message))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(customer), Some(total)) = (args.first(), args.get(1)) else {
        eprintln!("usage: place_order <customer> <total>   (DATABASE_URL names the database)");
        return ExitCode::from(2);
    };
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("place_order: set DATABASE_URL, e.g. postgres://app:secret@localhost:5432/app");
        return ExitCode::from(2);
    };
    let (mut db, connection) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("place_order: cannot connect to DATABASE_URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(connection);
    match place_order(&mut db, customer, total).await {
        Ok((order, message)) => {
            println!("order {order} placed; message {message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("place_order: {e} (nothing was written)");
            ExitCode::FAILURE
        }
    }
}
