// SPDX-License-Identifier: MIT
// idempotent_inbox: a payment is delivered four times (the first attempt fails
// after its write, the others are redeliveries) and the account is credited
// exactly once: the inbox records the message id in the same SQLite
// transaction as the credit, and only when the handler succeeds. Then account
// events arrive out of order (v1, v3, v2) and are applied in version order.
//
//   delivery ─▶ inbox.handle ─▶ id new? ─▶ handler(tx): UPDATE accounts ─▶ COMMIT (credit + id, or neither)
#include <postbox/postbox.hpp>
#include <postbox/inbox.hpp>
#include <postbox/sqlite.hpp>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>

struct payment {
  std::string account;
  long long cents = 0;
};
struct account_changed {
  std::string change;
};

int main() {
  const auto path = std::filesystem::temp_directory_path() / "postbox_example_inbox.db";
  auto clean = [&] { for (const char* s : {"", "-wal", "-shm"}) std::filesystem::remove(path.string() + s); };
  clean();
  {
    postbox::sqlite_store db(path.string());
    auto setup = db.begin();
    (void)setup.exec("CREATE TABLE accounts (id TEXT PRIMARY KEY, cents INTEGER NOT NULL, history TEXT NOT NULL);"
                     "INSERT INTO accounts VALUES ('acc-1', 0, '')");
    (void)setup.commit();

    postbox::inbox billing(db, "billing");  // ids are recorded per consumer name
    const auto pay = postbox::make_envelope(std::string("payment.received"), payment{"acc-1", 2500});
    int attempts = 0;
    for (int delivery = 1; delivery <= 4; ++delivery) {
      const auto outcome = billing.handle(pay, [&](auto& tx, const auto& m) {
        const auto rc = tx.exec("UPDATE accounts SET cents = cents + ?1 WHERE id = ?2", m.payload.cents,
                                m.payload.account);
        if (++attempts == 1) throw std::runtime_error("ledger timeout");  // after the write: rolled back
        return rc;
      });
      std::printf("delivery %d: %s%s%s\n", delivery, postbox::to_string(outcome.status).data(),
                  outcome.failed() ? ", " : "", outcome.message.c_str());
    }
    const auto stats = billing.stats();
    {
      auto tx = db.begin();
      std::printf("balance %lld cents; processed %llu, duplicates %llu, failed %llu\n",
                  static_cast<long long>(tx.query_int64("SELECT cents FROM accounts WHERE id = 'acc-1'").value_or(-1)),
                  static_cast<unsigned long long>(stats.processed), static_cast<unsigned long long>(stats.duplicates),
                  static_cast<unsigned long long>(stats.failed));
    }

    postbox::ordered_apply<postbox::sqlite_store, account_changed> history(db, "account-history");
    auto append = [](auto& tx, const auto& e) {
      return tx.exec("UPDATE accounts SET history = history || ?1 WHERE id = 'acc-1'", e.payload.change);
    };
    const std::pair<std::uint64_t, const char*> arrivals[] = {{1, "opened;"}, {3, "closed;"}, {2, "frozen;"}};
    for (const auto& [version, change] : arrivals) {
      const auto e = postbox::make_envelope(std::string("account.changed"), account_changed{change});
      const auto r = history.apply("acc-1", version, e, append);
      std::printf("version %llu: %s", static_cast<unsigned long long>(version), postbox::to_string(r.status).data());
      for (const auto m : r.missing) std::printf(" (missing %llu)", static_cast<unsigned long long>(m));
      std::printf(" -> at version %llu\n", static_cast<unsigned long long>(r.current));
    }
    auto tx = db.begin();  // plain sqlite3 calls work on the transaction's connection too
    sqlite3_stmt* q = nullptr;
    sqlite3_prepare_v2(tx.connection(), "SELECT history FROM accounts WHERE id = 'acc-1'", -1, &q, nullptr);
    if (sqlite3_step(q) == SQLITE_ROW) std::printf("history: %s\n", sqlite3_column_text(q, 0));
    sqlite3_finalize(q);
  }
  clean();
  return 0;
}
