(function () {
  document.querySelectorAll('button.copy').forEach(function (b) {
    b.addEventListener('click', function () {
      var text = b.parentNode.querySelector('code.replay').textContent;
      if (navigator.clipboard) {
        navigator.clipboard.writeText(text).then(function () {
          b.textContent = 'copied';
          setTimeout(function () { b.textContent = 'copy'; }, 1200);
        });
      }
    });
  });
  var only = document.getElementById('only-failing');
  if (only) {
    only.addEventListener('change', function () {
      document.querySelectorAll('table.matrix tbody tr').forEach(function (tr) {
        tr.hidden = only.checked && !tr.querySelector('td.st-fail');
      });
    });
  }
  document.querySelectorAll('input.filter').forEach(function (inp) {
    inp.addEventListener('input', function () {
      var box = document.getElementById(inp.getAttribute('data-target'));
      var q = inp.value.toLowerCase();
      if (!box) { return; }
      box.querySelectorAll('tbody tr').forEach(function (tr) {
        var hay = (tr.getAttribute('data-case') + ' ' + tr.getAttribute('data-check')).toLowerCase();
        tr.hidden = q !== '' && hay.indexOf(q) < 0;
      });
    });
  });
  document.documentElement.setAttribute('data-scripts', 'ok');
})();
